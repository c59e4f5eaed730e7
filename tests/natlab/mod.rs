//! The NAT lab: network namespaces joined by a "public internet" bridge, with home networks each
//! behind its own NAT namespace made with nftables (`lab/nft/*.nft`, shared with
//! `lab/natlab.sh`). How each NAT kind is made: `docs/nat.md`.
//!
//! Addresses (only 198.18.0.0/15): the public segment is 198.18.0.0/24 (public hosts from
//! 198.18.0.1, NAT routers' public sides from 198.18.0.101); home `i` is 198.19.i.0/24 behind
//! router 198.19.i.1, its hosts from 198.19.i.2.
//!
//! Everything a [`Lab`] makes lives in namespaces named `natlab-<pid>-<n>-...`: dropping the lab
//! deletes them (and with them every interface, conntrack entry and rule), and a new lab first
//! deletes those of test processes that are gone (killed before they could clean up).
//! Processes started in the lab must be dropped before it (declare the lab first).

#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The five NAT behaviours of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatKind {
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, filtering by remote address.
    AddressRestricted,
    /// Endpoint-independent mapping, filtering by remote address and port.
    PortRestricted,
    /// A new public port per destination endpoint, allocated sequentially.
    SymmetricSequential,
    /// A new random public port per destination endpoint.
    SymmetricRandom,
}

impl NatKind {
    /// All five, from the most open to the hardest.
    pub const ALL: [NatKind; 5] = [
        NatKind::FullCone,
        NatKind::AddressRestricted,
        NatKind::PortRestricted,
        NatKind::SymmetricSequential,
        NatKind::SymmetricRandom,
    ];

    /// Name of its rule file in `lab/nft/` (and its name in `lab/natlab.sh`).
    pub fn name(self) -> &'static str {
        match self {
            NatKind::FullCone => "full-cone",
            NatKind::AddressRestricted => "address-restricted",
            NatKind::PortRestricted => "port-restricted",
            NatKind::SymmetricSequential => "symmetric-sequential",
            NatKind::SymmetricRandom => "symmetric-random",
        }
    }

    /// Short name for tables (the reference's abbreviations).
    pub fn short(self) -> &'static str {
        match self {
            NatKind::FullCone => "fcn",
            NatKind::AddressRestricted => "rcn",
            NatKind::PortRestricted => "prcn",
            NatKind::SymmetricSequential => "symsp",
            NatKind::SymmetricRandom => "symrp",
        }
    }

    fn rules(self) -> &'static str {
        match self {
            NatKind::FullCone => include_str!("../../lab/nft/full-cone.nft"),
            NatKind::AddressRestricted => include_str!("../../lab/nft/address-restricted.nft"),
            NatKind::PortRestricted => include_str!("../../lab/nft/port-restricted.nft"),
            NatKind::SymmetricSequential => include_str!("../../lab/nft/symmetric-sequential.nft"),
            NatKind::SymmetricRandom => include_str!("../../lab/nft/symmetric-random.nft"),
        }
    }
}

impl fmt::Display for NatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

const BASE_RULES: &str = include_str!("../../lab/nft/base.nft");

/// First public port of the sequential symmetric NAT.
pub const SEQUENTIAL_BASE: u16 = 20000;
/// How many ports the sequential symmetric NAT cycles through.
pub const SEQUENTIAL_PORTS: u16 = 1000;

/// A home network's NAT.
#[derive(Debug, Clone)]
pub struct Nat {
    /// Its kind.
    pub kind: NatKind,
    /// Its public address.
    pub wan: Ipv4Addr,
    /// Share of UDP datagrams it drops, per mille.
    pub loss_permille: u16,
    /// Its namespace.
    pub netns: String,
}

/// A host: a namespace with one address (or more, for public hosts).
#[derive(Debug, Clone)]
pub struct Host {
    /// Its namespace.
    pub netns: String,
    /// Its addresses, the first the main one.
    pub ips: Vec<Ipv4Addr>,
}

impl Host {
    /// The main address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ips[0]
    }

    /// `program` to run in this host's namespace (`ip netns exec`; the program keeps its pid).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// A UDP socket bound in this host's namespace (at `ip`, port `port`, 0 for any).
    pub fn udp(&self, ip: Ipv4Addr, port: u16) -> UdpSocket {
        let addr = SocketAddrV4::new(ip, port);
        in_netns(&self.netns, move || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("cannot bind UDP {addr} in {}: {e}", self.netns))
    }
}

/// A home: a NAT and the host behind it.
#[derive(Debug, Clone)]
pub struct Home {
    /// The NAT router.
    pub nat: Nat,
    /// The host behind it.
    pub host: Host,
}

/// Runs `f` on a thread that has entered the network namespace `netns`; sockets made there stay
/// in it whichever thread uses them later.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let handle = File::open(format!("/run/netns/{netns}"))
        .unwrap_or_else(|e| panic!("no namespace {netns}: {e}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only (a network namespace switch affects the calling
            // thread); the descriptor is valid for the call.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {netns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace")
    })
}

/// Runs `ip` (or another command), panicking with its output when it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    run("ip", args);
}

/// Whether the lab can run here: root, `ip` and `nft`. When it cannot, a test fails if `CI` is
/// set (`.ci/run` runs as root and installs them) and otherwise says loudly that it is skipped:
/// the caller returns.
pub fn lab_possible(test: &str) -> bool {
    let root = unsafe_free_is_root();
    let tools = ["ip", "nft"]
        .into_iter()
        .filter(|t| {
            Command::new(t)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect::<Vec<_>>();
    let why = if !root {
        "not root".to_owned()
    } else if !tools.is_empty() {
        format!("{} not installed", tools.join(" and "))
    } else {
        return true;
    };
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(
        !ci,
        "{test}: {why}, and CI is set: CI must run the NAT lab, not skip it (.ci/run runs as root \
         and installs iproute2 and nftables)"
    );
    eprintln!("\n*** SKIPPED {test}: {why}: the NAT lab needs root, ip and nft ***\n");
    false
}

/// Root, read from `/proc/self/status` (no `unsafe` geteuid).
fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Deletes the namespaces of earlier labs whose process is gone.
fn reap_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("natlab-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("natlab: deleting namespace {name} left by process {pid}");
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// The lab: a public segment (a bridge in its own namespace) with public hosts and homes.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    /// Public hosts so far.
    publics: u8,
    /// Homes so far.
    homes: u8,
    /// UDP mapping timeout of the NATs (conntrack and the cone maps), seconds.
    pub udp_timeout: u32,
    /// Port step of the sequential symmetric NATs (1: consecutive ports).
    pub port_step: u16,
}

impl Lab {
    /// A new, empty lab (the bridge only).
    pub fn new() -> Lab {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        reap_stale();
        let prefix = format!(
            "natlab-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            publics: 0,
            homes: 0,
            udp_timeout: 60,
            port_step: 1,
        };
        let inet = lab.netns("inet");
        ip(&["-n", &inet, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &inet, "link", "set", "br0", "up"]);
        lab
    }

    /// The namespaces' name prefix (`natlab-<pid>-<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Makes namespace `<prefix>-<name>` with loopback up; its full name.
    fn netns(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &full]);
        self.namespaces.push(full.clone());
        ip(&["-n", &full, "link", "set", "lo", "up"]);
        full
    }

    /// Plugs interface `inside` of namespace `netns` into the public bridge as port `port`.
    fn plug(&self, netns: &str, inside: &str, port: &str) {
        let inet = format!("{}-inet", self.prefix);
        ip(&[
            "-n", netns, "link", "add", inside, "type", "veth", "peer", "name", port, "netns",
            &inet,
        ]);
        ip(&["-n", &inet, "link", "set", port, "master", "br0", "up"]);
        ip(&["-n", netns, "link", "set", inside, "up"]);
    }

    /// A host on the public segment with `addresses` addresses (198.18.0.1, .2, ... in order of
    /// creation).
    pub fn public_host(&mut self, name: &str, addresses: u8) -> Host {
        let ns = self.netns(name);
        self.plug(&ns, "eth0", &format!("p{}", self.publics));
        let mut ips = Vec::new();
        for _ in 0..addresses {
            self.publics += 1;
            assert!(self.publics <= 100, "at most 100 public addresses");
            let a = Ipv4Addr::new(198, 18, 0, self.publics);
            ip(&["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"]);
            ips.push(a);
        }
        Host { netns: ns, ips }
    }

    /// A home network behind a NAT of `kind` dropping `loss_permille` ‰ of the UDP datagrams it
    /// forwards, with one host.
    pub fn home(&mut self, kind: NatKind, loss_permille: u16) -> Home {
        self.homes += 1;
        let i = self.homes;
        assert!(i <= 150, "at most 150 homes");
        let nat_ns = self.netns(&format!("nat{i}"));
        let host_ns = self.netns(&format!("home{i}"));
        let wan = Ipv4Addr::new(198, 18, 0, 100 + i);
        let gw = Ipv4Addr::new(198, 19, i, 1);
        let host_ip = Ipv4Addr::new(198, 19, i, 2);
        self.plug(&nat_ns, "wan", &format!("n{i}"));
        ip(&[
            "-n",
            &nat_ns,
            "addr",
            "add",
            &format!("{wan}/24"),
            "dev",
            "wan",
        ]);
        ip(&[
            "-n", &nat_ns, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns",
            &host_ns,
        ]);
        ip(&[
            "-n",
            &nat_ns,
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            "lan",
        ]);
        ip(&["-n", &nat_ns, "link", "set", "lan", "up"]);
        ip(&[
            "-n",
            &host_ns,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &host_ns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &host_ns,
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
        ]);
        self.make_nat(&nat_ns, kind, wan, loss_permille);
        Home {
            nat: Nat {
                kind,
                wan,
                loss_permille,
                netns: nat_ns,
            },
            host: Host {
                netns: host_ns,
                ips: vec![host_ip],
            },
        }
    }

    /// A home network with `hosts` hosts (198.19.i.2, .3, ...) behind one NAT of `kind`, on a
    /// bridge (the NAT's `lan`, so the rules are those of [`Lab::home`]). The NAT does not
    /// hair-pin: a datagram from the LAN to its public address ends at the NAT itself.
    pub fn shared_home(
        &mut self,
        kind: NatKind,
        loss_permille: u16,
        hosts: u8,
    ) -> (Nat, Vec<Host>) {
        assert!((1..=100).contains(&hosts), "1 to 100 hosts");
        self.homes += 1;
        let i = self.homes;
        assert!(i <= 150, "at most 150 homes");
        let nat_ns = self.netns(&format!("nat{i}"));
        let wan = Ipv4Addr::new(198, 18, 0, 100 + i);
        let gw = Ipv4Addr::new(198, 19, i, 1);
        self.plug(&nat_ns, "wan", &format!("n{i}"));
        ip(&[
            "-n",
            &nat_ns,
            "addr",
            "add",
            &format!("{wan}/24"),
            "dev",
            "wan",
        ]);
        ip(&["-n", &nat_ns, "link", "add", "lan", "type", "bridge"]);
        ip(&[
            "-n",
            &nat_ns,
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            "lan",
        ]);
        ip(&["-n", &nat_ns, "link", "set", "lan", "up"]);
        let mut out = Vec::new();
        for k in 0..hosts {
            let host_ns = self.netns(&format!("home{i}-{k}"));
            let host_ip = Ipv4Addr::new(198, 19, i, 2 + k);
            let port = format!("l{k}");
            ip(&[
                "-n", &nat_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &host_ns,
            ]);
            ip(&["-n", &nat_ns, "link", "set", &port, "master", "lan", "up"]);
            ip(&[
                "-n",
                &host_ns,
                "addr",
                "add",
                &format!("{host_ip}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &host_ns, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &host_ns,
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
            ]);
            out.push(Host {
                netns: host_ns,
                ips: vec![host_ip],
            });
        }
        self.make_nat(&nat_ns, kind, wan, loss_permille);
        (
            Nat {
                kind,
                wan,
                loss_permille,
                netns: nat_ns,
            },
            out,
        )
    }

    /// The NAT's rule set, as `nft list ruleset` prints it (for failure messages).
    pub fn ruleset(&self, nat: &Nat) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &nat.netns, "nft", "list", "ruleset"])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Lab {
    /// Turns `nat_ns` into a NAT of `kind` with `wan` as its public address: forwarding, the
    /// lab's conntrack UDP timeouts, and the kind's nftables rules (dropping `loss_permille` ‰).
    fn make_nat(&self, nat_ns: &str, kind: NatKind, wan: Ipv4Addr, loss_permille: u16) {
        let t = self.udp_timeout.to_string();
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.netfilter.nf_conntrack_udp_timeout", t.as_str()),
            ("net.netfilter.nf_conntrack_udp_timeout_stream", t.as_str()),
        ] {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    nat_ns,
                    "sysctl",
                    "-qw",
                    &format!("{key}={value}"),
                ],
            );
        }
        let rules = nat_rules(kind, wan, loss_permille, self.udp_timeout, self.port_step);
        nft_in(nat_ns, &rules);
    }
}

/// Loads `rules` with `nft -f -` in namespace `netns`, panicking with nft's complaint.
pub fn nft_in(netns: &str, rules: &str) {
    let mut nft = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    std::io::Write::write_all(nft.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
    let out = nft.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft refused rules in {netns}:\n{}\n{rules}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The nftables rule set of a NAT: `lab/nft/base.nft` and the kind's file, with their `$NAME`
/// variables replaced by values (nft's own `define` cannot stand where a set's timeout goes).
pub fn nat_rules(
    kind: NatKind,
    wan: Ipv4Addr,
    loss_permille: u16,
    udp_timeout: u32,
    port_step: u16,
) -> String {
    let mut rules = format!("{BASE_RULES}\n{}", kind.rules());
    assert!(
        (1..=45).contains(&port_step),
        "port step {port_step}: 1 to 45 fit 1000 ports below 65536"
    );
    let port_map: Vec<String> = (0..SEQUENTIAL_PORTS)
        .map(|i| format!("{i} : {}", SEQUENTIAL_BASE + i * port_step))
        .collect();
    for (name, value) in [
        ("$PORT_MAP", port_map.join(", ")),
        ("$PORT_STEP", port_step.to_string()),
        ("$WAN_IP", wan.to_string()),
        ("$LOSS", loss_permille.to_string()),
        ("$MAP_TIMEOUT", format!("{udp_timeout}s")),
        ("$PORT_BASE", SEQUENTIAL_BASE.to_string()),
        ("$PORT_COUNT", SEQUENTIAL_PORTS.to_string()),
    ] {
        rules = rules.replace(name, &value);
    }
    rules
}

/// Receives one datagram within `timeout`: its bytes and sender.
pub fn recv(sock: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddrV4)> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 2048];
    match sock.recv_from(&mut buf) {
        Ok((n, std::net::SocketAddr::V4(from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

/// Starts `p2psp <args>` in `host`, its standard error in `dir/<name>.log`.
pub fn spawn_in<S: AsRef<std::ffi::OsStr>>(
    host: &Host,
    dir: &std::path::Path,
    name: &str,
    args: &[S],
) -> crate::support::Proc {
    let log = File::create(crate::support::peer_log(dir, name)).unwrap();
    let mut cmd = host.command(crate::support::BIN);
    cmd.env("RUST_LOG", "p2psp=info")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    crate::support::Proc::spawn(name, &mut cmd)
}

/// The entry of the `/status` list `list` (neighbours, teammates, the splitter's NTS peers) whose
/// `endpoint` is at `ip`, any port (`Null` if none).
pub fn entry_at(list: &serde_json::Value, ip: Ipv4Addr) -> serde_json::Value {
    let prefix = format!("{ip}:");
    list.as_array()
        .and_then(|a| {
            a.iter().find(|e| {
                e["endpoint"]
                    .as_str()
                    .is_some_and(|at| at.starts_with(&prefix))
            })
        })
        .cloned()
        .unwrap_or_default()
}

/// The splitter's port on the lab's public segment.
pub const SPLITTER_PORT: u16 = 8001;
/// Where the lab's peers serve `--metrics`, each inside its own namespace.
pub const METRICS_PORT: u16 = 9100;

/// A splitter on `host` (bound to its address, port [`SPLITTER_PORT`], one shard) with `flags`
/// besides, logging to `dir` as `splitter`; returns once it listens.
pub fn start_splitter<S: AsRef<str>>(
    host: &Host,
    dir: &std::path::Path,
    flags: &[S],
) -> crate::support::Proc {
    let mut args: Vec<String> = vec![
        "splitter".into(),
        "--bind".into(),
        host.ip().to_string(),
        "--port".into(),
        SPLITTER_PORT.to_string(),
        "--shards".into(),
        "1".into(),
    ];
    args.extend(flags.iter().map(|f| f.as_ref().to_owned()));
    let mut splitter = spawn_in(host, dir, "splitter", &args);
    wait_listening(&mut splitter, dir);
    splitter
}

/// Waits until the splitter logging to `dir` as `splitter` says it listens; panics with its log
/// if it does not within 10 s.
pub fn wait_listening(splitter: &mut crate::support::Proc, dir: &std::path::Path) {
    crate::support::wait_for_line(
        splitter,
        &crate::support::peer_log(dir, "splitter"),
        Duration::from_secs(10),
        |l| l.starts_with("p2psp splitter listening on"),
    )
    .unwrap_or_else(|log| panic!("the splitter did not start:\n{log}"));
}

/// A lab peer's command line: `peer --splitter PUBLIC:SPLITTER_PORT --player-port 0 --metrics
/// 127.0.0.1:METRICS_PORT` and `flags`.
pub fn peer_args<S: AsRef<str>>(public: &Host, flags: &[S]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "peer".into(),
        "--splitter".into(),
        format!("{}:{SPLITTER_PORT}", public.ip()),
        "--player-port".into(),
        "0".into(),
        "--metrics".into(),
        format!("127.0.0.1:{METRICS_PORT}"),
    ];
    a.extend(flags.iter().map(|f| f.as_ref().to_owned()));
    a
}

/// The `/status` of the program serving `--metrics` on `port` inside `host` (`Null` when it
/// does not answer).
pub fn status_in(host: &Host, port: u16) -> serde_json::Value {
    http_get_in(host, port, "/status")
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// `GET path` from `127.0.0.1:port` inside `host`'s namespace (a peer's `--metrics`); the body
/// of a 200 answer.
pub fn http_get_in(host: &Host, port: u16, path: &str) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = in_netns(&host.netns, || {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(2),
        )
    })
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut data = Vec::new();
    s.take(1 << 22).read_to_end(&mut data).ok()?;
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    data.starts_with(b"HTTP/1.1 200")
        .then(|| data[end + 4..].to_vec())
        .or_else(|| {
            data.starts_with(b"HTTP/1.0 200")
                .then(|| data[end + 4..].to_vec())
        })
}
