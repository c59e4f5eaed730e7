//! `--config FILE` and the flags every long-running command shares.
//!
//! A configuration file is TOML whose keys are the command's long flag names without the dashes
//! (`header-size = 16384`, `lrs = true`, `source = "http://..."`). A flag given on the command
//! line wins over the file; an unknown key or a bad value is an error naming the key.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// Flags of the splitter and the peer for running them as a service.
#[derive(Debug, Clone, Default, Args)]
pub struct ServiceArgs {
    /// Read flags from this TOML file (keys are the long flag names: `header-size = 16384`);
    /// flags on the command line win over the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics, JSON at /status and a live status page at / on this
    /// address (HOST:PORT, or a port for 127.0.0.1).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub metrics: Option<SocketAddr>,
}

/// Parses `--metrics`: `HOST:PORT`, or a bare port for 127.0.0.1.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("`{s}` is not HOST:PORT (or a port for 127.0.0.1)"))
}

use std::ffi::{OsStr, OsString};

use clap::ArgAction;
use clap::parser::ValueSource;

/// The command line with a configuration file's settings added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    /// Arguments to parse: the command line, then `--key=value` for each key of the file that
    /// the command line does not set.
    pub args: Vec<OsString>,
    /// The file, if one was given.
    pub file: Option<PathBuf>,
    /// The keys taken from the file.
    pub from_file: Vec<String>,
}

impl Expanded {
    /// Says that a flag's bad value came from the file: `--chunk-size 63 must be...` becomes
    /// `--config FILE: key `chunk-size`: --chunk-size 63 must be...`.
    pub fn blame(&self, message: &str) -> String {
        let Some(file) = &self.file else {
            return message.to_owned();
        };
        for key in &self.from_file {
            let flag = format!("--{key}");
            if message
                .strip_prefix(&flag)
                .is_some_and(|rest| rest.starts_with([' ', ':']) || rest.is_empty())
            {
                return format!("--config {}: key `{key}`: {message}", file.display());
            }
        }
        message.to_owned()
    }
}

/// Adds the settings of `--config FILE` (if the command line has one) to the command line `raw`
/// of `cmd`. Keys are the long flag names of the subcommand; a flag on the command line wins.
/// The error is one line naming the file and the key.
///
/// A command line clap cannot parse is returned as it is, for clap to report.
pub fn expand(cmd: &clap::Command, raw: Vec<OsString>) -> Result<Expanded, String> {
    expand_with(cmd, raw, |path| {
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    })
}

/// [`expand`] with the file's text from `read` instead of the file system (sans-IO, for the
/// fuzzer and the property tests).
pub fn expand_with(
    cmd: &clap::Command,
    raw: Vec<OsString>,
    read: impl FnOnce(&std::path::Path) -> Result<String, String>,
) -> Result<Expanded, String> {
    let unchanged = |args| Expanded {
        args,
        file: None,
        from_file: Vec::new(),
    };
    let Ok(matches) = cmd.clone().try_get_matches_from(&raw) else {
        return Ok(unchanged(raw));
    };
    let Some((name, sub)) = matches.subcommand() else {
        return Ok(unchanged(raw));
    };
    let Ok(Some(path)) = sub.try_get_one::<PathBuf>("config") else {
        return Ok(unchanged(raw));
    };
    let path = path.clone();
    let at = |what: String| format!("--config {}: {what}", path.display());
    let text = read(&path).map_err(at)?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().replace('\n', " ");
        match line {
            Some(l) => at(format!("line {l}: {message}")),
            None => at(message),
        }
    })?;
    let sub_cmd = cmd
        .find_subcommand(name)
        .expect("clap matched this subcommand")
        .clone();
    let keys: Vec<&clap::Arg> = sub_cmd
        .get_arguments()
        .filter(|a| a.get_long().is_some_and(|l| l != "help" && l != "version"))
        .collect();
    let mut args = raw;
    let mut from_file = Vec::new();
    for (key, value) in &table {
        if key == "config" {
            return Err(at(
                "key `config`: a configuration file cannot name another one".into(),
            ));
        }
        let Some(arg) = keys.iter().find(|a| a.get_long() == Some(key.as_str())) else {
            let hint = keys
                .iter()
                .filter_map(|a| a.get_long())
                .find(|l| *l == key.replace('_', "-"))
                .map(|l| format!(" (did you mean `{l}`?)"))
                .unwrap_or_default();
            let known: Vec<&str> = keys
                .iter()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "config")
                .collect();
            return Err(at(format!(
                "unknown key `{key}`{hint}; `p2psp {name}` takes: {}",
                known.join(", ")
            )));
        };
        if sub.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        let bad = |what: &str| at(format!("key `{key}`: {what}"));
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                toml::Value::Boolean(true) => args.push(format!("--{key}").into()),
                toml::Value::Boolean(false) => {}
                _ => return Err(bad("expected true or false")),
            }
            from_file.push(key.clone());
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(_) => return Err(bad("expected a value, not true or false")),
            _ => return Err(bad("expected a string or a number")),
        };
        let flag: OsString = format!("--{key}={text}").into();
        // The flag's own parser judges the value, alone on a command line.
        if let Err(e) = sub_cmd
            .clone()
            .try_get_matches_from([OsStr::new(name), flag.as_os_str()])
        {
            return Err(bad(&clap_message(&e)));
        }
        args.push(flag);
        from_file.push(key.clone());
    }
    Ok(Expanded {
        args,
        file: Some(path),
        from_file,
    })
}

/// The gist of a clap error, on one line.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid value").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// Parses a duration flag: `10` (seconds), `10s`, `500ms`, `2m`; from 1 ms to a day.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" | "min" => v * 60.0,
        _ => return Err(format!("unknown unit in `{s}` (use ms, s or m)")),
    };
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("duration `{s}` must be between 1 ms and a day"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Debug, Subcommand)]
    enum Sub {
        Run(RunArgs),
    }

    #[derive(Debug, clap::Args)]
    struct RunArgs {
        #[arg(long, default_value_t = 1024)]
        chunk_size: usize,
        #[arg(long, default_value = "test")]
        source: String,
        #[arg(long)]
        lrs: bool,
        #[arg(long)]
        shards: Option<usize>,
        #[command(flatten)]
        service: ServiceArgs,
    }

    fn run(file: &str, cli: &[&str]) -> Result<(RunArgs, Expanded), String> {
        let dir = std::env::temp_dir().join(format!("p2psp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{n}.toml"));
        std::fs::write(&path, file).unwrap();
        let mut raw: Vec<OsString> = vec!["p2psp".into(), "run".into()];
        raw.extend(cli.iter().map(OsString::from));
        raw.push("--config".into());
        raw.push(path.clone().into());
        let e = expand(&Cli::command(), raw)?;
        let Sub::Run(args) = Cli::try_parse_from(&e.args)
            .map_err(|e| e.to_string())?
            .command;
        Ok((args, e))
    }

    #[test]
    fn file_sets_flags_and_the_command_line_wins() {
        let (a, e) = run(
            "chunk-size = 512\nsource = \"-\"\nlrs = true\nshards = 2\nmetrics = \"127.0.0.1:9100\"\n",
            &["--chunk-size", "256"],
        )
        .unwrap();
        assert_eq!(a.chunk_size, 256);
        assert_eq!(a.source, "-");
        assert!(a.lrs);
        assert_eq!(a.shards, Some(2));
        assert_eq!(a.service.metrics.unwrap().port(), 9100);
        assert!(!e.from_file.contains(&"chunk-size".to_owned()));
        let (a, _) = run("lrs = false\n", &[]).unwrap();
        assert!(!a.lrs);
    }

    #[test]
    fn bad_files_give_one_line_naming_the_key() {
        for (file, want) in [
            (
                "chunk_size = 5\n",
                "unknown key `chunk_size` (did you mean `chunk-size`?)",
            ),
            ("bogus = 1\n", "unknown key `bogus`"),
            (
                "chunk-size = \"big\"\n",
                "key `chunk-size`: invalid value 'big'",
            ),
            ("chunk-size = -3\n", "key `chunk-size`: invalid value '-3'"),
            ("lrs = \"yes\"\n", "key `lrs`: expected true or false"),
            (
                "shards = [1, 2]\n",
                "key `shards`: expected a string or a number",
            ),
            ("metrics = \"nowhere\"\n", "key `metrics`:"),
            ("config = \"x.toml\"\n", "key `config`"),
            ("chunk-size = \n", "line 1:"),
        ] {
            let err = run(file, &[])
                .err()
                .unwrap_or_else(|| panic!("{file} was accepted"));
            assert!(err.contains(want), "{file}: {err}");
            assert!(err.starts_with("--config "), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn blame_points_at_the_file() {
        let e = Expanded {
            args: vec![],
            file: Some("/etc/p2psp.toml".into()),
            from_file: vec!["chunk-size".into()],
        };
        assert_eq!(
            e.blame("--chunk-size 63 must be between 64 and 1400"),
            "--config /etc/p2psp.toml: key `chunk-size`: --chunk-size 63 must be between 64 and 1400"
        );
        assert_eq!(
            e.blame("--team-size must be at least 1"),
            "--team-size must be at least 1"
        );
    }

    #[test]
    fn missing_file() {
        let raw: Vec<OsString> = ["p2psp", "run", "--config", "/nonexistent/p2psp.toml"]
            .iter()
            .map(OsString::from)
            .collect();
        let err = expand(&Cli::command(), raw).unwrap_err();
        assert!(
            err.starts_with("--config /nonexistent/p2psp.toml: "),
            "{err}"
        );
    }

    #[test]
    fn metrics_addresses() {
        assert_eq!(parse_addr("9100").unwrap().to_string(), "127.0.0.1:9100");
        assert_eq!(
            parse_addr("0.0.0.0:9100").unwrap().to_string(),
            "0.0.0.0:9100"
        );
        assert!(parse_addr("nope").is_err());
    }
}
