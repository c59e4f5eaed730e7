//! NTS retries (`N`) and the splitter's extra port (U2x) through the NAT lab (`docs/nat.md`,
//! reference-notes §6.4): real `p2psp` processes in network namespaces behind nftables NATs.
//! Needs root, `ip` and `nft`: skipped loudly without them, a failure when `CI` is set.

mod natlab;
mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use natlab::{Home, Host, Lab, NatKind, lab_possible};
use support::Proc;

use natlab::{METRICS_PORT, SPLITTER_PORT};

/// A splitter (`--nts`) and a monitor on the public segment.
struct Team {
    public: Host,
    dir: std::path::PathBuf,
    procs: Vec<Proc>,
    /// The extra port the splitter announced at startup.
    extra_port: u16,
}

impl Team {
    fn start(lab: &mut Lab, dir_name: &str) -> Team {
        let dir = support::test_dir(dir_name);
        let public = lab.public_host("splitter", 1);
        let monitor_host = lab.public_host("monitor", 1);
        let mut splitter = natlab::start_splitter(
            &public,
            &dir,
            &[
                "--nts",
                "--bitrate",
                "500k",
                "--buffer-size",
                "64",
                "--metrics",
                &format!("127.0.0.1:{METRICS_PORT}"),
            ],
        );
        let log = support::peer_log(&dir, "splitter");
        let extra = support::wait_for_line(&mut splitter, &log, Duration::from_secs(10), |l| {
            l.starts_with("p2psp splitter NTS extra port ")
        })
        .unwrap_or_else(|log| panic!("the splitter announced no extra port:\n{log}"));
        let extra_port = port_after(&extra, &format!("{}:", public.ip()))
            .unwrap_or_else(|| panic!("no port in {extra:?}"));
        let mut team = Team {
            public,
            dir,
            procs: vec![splitter],
            extra_port,
        };
        let args = team.peer_args(true, 0);
        let mut monitor = natlab::spawn_in(&monitor_host, &team.dir, "monitor", &args);
        support::wait_joined(&team.dir, &mut monitor);
        team.procs.push(monitor);
        team
    }

    fn peer_args(&self, monitor: bool, retries: u8) -> Vec<String> {
        let mut a = natlab::peer_args(&self.public, &["--nts"]);
        if monitor {
            a.push("--monitor".into());
        }
        if retries > 0 {
            a.extend(["--nts-retries".into(), retries.to_string()]);
        }
        a
    }

    /// Starts a peer behind `home` and waits until it is incorporated: its `NTS ID` line.
    fn join(&mut self, home: &Home, name: &str, retries: u8) -> String {
        let args = self.peer_args(false, retries);
        let mut p = natlab::spawn_in(&home.host, &self.dir, name, &args);
        let log = support::peer_log(&self.dir, name);
        let line = support::wait_for_line(&mut p, &log, Duration::from_secs(30), |l| {
            l.contains(": NTS ID ")
        })
        .unwrap_or_else(|t| panic!("{name} was not incorporated:\n{t}"));
        eprintln!("{name:<6} {line}");
        self.procs.push(p);
        line
    }

    fn splitter_status(&self) -> serde_json::Value {
        natlab::status_in(&self.public, METRICS_PORT)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(support::peer_log(&self.dir, name)).unwrap_or_default()
    }
}

/// The number after `prefix` in `line`.
fn port_after(line: &str, prefix: &str) -> Option<u16> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `nft list ...` in `netns`.
fn nft_list(netns: &str, what: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "list"])
        .args(what)
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The packet count of the first `counter` in `listing`.
fn counter_packets(listing: &str) -> u64 {
    port_after(listing, "counter packets ")
        .map(u64::from)
        .unwrap_or_else(|| panic!("no counter in {listing}"))
}

/// The splitter's `/status` entry for the member whose endpoint is at `ip`.
fn member_at(status: &serde_json::Value, ip: Ipv4Addr) -> serde_json::Value {
    natlab::entry_at(&status["nts"]["peers"], ip)
}

/// A peer's `/status` entry for the teammate whose endpoint is at `ip`.
fn teammate_at(status: &serde_json::Value, ip: Ipv4Addr) -> serde_json::Value {
    natlab::entry_at(&status["nts"]["teammates"], ip)
}

/// Two peers behind port-restricted NATs. The second one's NAT drops its UDP to the first one's
/// public address unless it comes from a port that has sent `ID‖N` to the splitter (an nftables
/// set filled by that very datagram), so its first attempt cannot connect the pair whatever the
/// timing. With `--nts-retries 1` it retries from a new port and ends a member at that endpoint,
/// reaching its teammate directly, and both sides count the retry.
#[test]
fn a_peer_whose_first_attempt_fails_retries_from_a_new_port_and_joins_direct() {
    if !lab_possible("a_peer_whose_first_attempt_fails_retries_from_a_new_port_and_joins_direct") {
        return;
    }
    let _one = support::one_at_a_time();
    let started = Instant::now();
    let mut lab = Lab::new();
    let first = lab.home(NatKind::PortRestricted, 0);
    let second = lab.home(NatKind::PortRestricted, 0);
    let mut team = Team::start(&mut lab, "nat-retry");
    let splitter_ip = team.public.ip();
    natlab::nft_in(
        &second.nat.netns,
        &format!(
            "table ip retry {{
                set retried {{ type inet_service; size 64; flags dynamic; }}
                chain forward {{
                    type filter hook forward priority filter - 20; policy accept;
                    iifname \"lan\" ip daddr {splitter_ip} udp length 16 @th,120,8 0x4e add @retried {{ udp sport }}
                    iifname \"lan\" ip daddr {} udp sport != @retried counter drop
                }}
            }}",
            first.nat.wan
        ),
    );
    team.join(&first, "first", 0);
    let line = team.join(&second, "second", 1);
    assert!(
        line.contains("after 1 retry from a new port"),
        "no retry: {line}"
    );
    // The retry's ports, from the peer's log: "retry 1 of 1 from IP:NEW (was IP:OLD)".
    let log = team.log("second");
    let retry = log
        .lines()
        .find(|l| l.contains("retry 1 of 1 from"))
        .unwrap_or_else(|| panic!("no retry line:\n{log}"));
    let host = format!("{}:", second.host.ip());
    let new_port = port_after(retry, &format!("from {host}")).expect("new port");
    let old_port = port_after(retry, &format!("was {host}")).expect("old port");
    assert_ne!(new_port, old_port);
    // Let both sides see each other's relays.
    std::thread::sleep(Duration::from_secs(4));
    let split = team.splitter_status();
    let at_splitter = member_at(&split, second.nat.wan);
    let second_status = natlab::status_in(&second.host, METRICS_PORT);
    let first_status = natlab::status_in(&first.host, METRICS_PORT);
    let dropped = counter_packets(&nft_list(
        &second.nat.netns,
        &["chain", "ip", "retry", "forward"],
    ));
    let retried = nft_list(&second.nat.netns, &["set", "ip", "retry", "retried"]);
    eprintln!(
        "second: first attempt from port {old_port} ({dropped} datagrams to the first peer dropped), retry from {new_port}; splitter: {} retries, member at {}, served {}",
        split["nts"]["retries"], at_splitter["endpoint"], at_splitter["served"]
    );
    eprintln!(
        "second reaches first: {}; first reaches second: {}; second played {}, lost {}; {:.1?} in all",
        teammate_at(&second_status, first.nat.wan),
        teammate_at(&first_status, second.nat.wan),
        second_status["totals"]["played"],
        second_status["totals"]["lost"],
        started.elapsed()
    );
    assert!(dropped > 0, "the first attempt's hellos were not dropped");
    assert!(
        retried.contains(&new_port.to_string()) && !retried.contains(&old_port.to_string()),
        "the N came from another port than the retry's: {retried}"
    );
    assert_eq!(split["nts"]["retries"], 1, "{}", split["nts"]);
    // Port-restricted NATs keep the port: the splitter has the member at the retry's socket.
    assert_eq!(
        at_splitter["endpoint"],
        format!("{}:{new_port}", second.nat.wan),
        "{}",
        split["nts"]
    );
    assert_eq!(at_splitter["served"], "direct");
    assert_eq!(second_status["nts"]["retries"], 1);
    assert_eq!(
        teammate_at(&second_status, first.nat.wan)["how"],
        "direct",
        "{}",
        second_status["nts"]
    );
    let seen_by_first = teammate_at(&first_status, second.nat.wan);
    assert_eq!(
        seen_by_first["endpoint"],
        format!("{}:{new_port}", second.nat.wan),
        "{}",
        first_status["nts"]
    );
    assert_eq!(seen_by_first["how"], "direct");
    assert!(second_status["totals"]["played"].as_u64().unwrap_or(0) > 0);
    drop(team);
    drop(lab);
}

/// A member behind a sequential symmetric NAT gets U2x when a newcomer is announced: its NAT
/// forwards its ID to the splitter's extra port (counted by nftables), the splitter counts the
/// ID and the U2x and renews its extra port; a member behind a port-restricted NAT (step 0)
/// gets plain U2 and sends nothing there.
#[test]
fn a_sequential_symmetric_member_gets_u2x_and_answers_at_the_extra_port() {
    if !lab_possible("a_sequential_symmetric_member_gets_u2x_and_answers_at_the_extra_port") {
        return;
    }
    let _one = support::one_at_a_time();
    let started = Instant::now();
    let mut lab = Lab::new();
    let symmetric = lab.home(NatKind::SymmetricSequential, 0);
    let cone = lab.home(NatKind::PortRestricted, 0);
    let newcomer = lab.home(NatKind::FullCone, 0);
    let mut team = Team::start(&mut lab, "nat-u2x");
    let splitter_ip = team.public.ip();
    // Count what each member's NAT forwards to the splitter's address at other ports than its
    // main one: the extra ports.
    for home in [&symmetric, &cone] {
        natlab::nft_in(
            &home.nat.netns,
            &format!(
                "table ip u2x {{
                    chain forward {{
                        type filter hook forward priority filter - 20; policy accept;
                        iifname \"lan\" ip daddr {splitter_ip} udp dport != {SPLITTER_PORT} counter
                    }}
                }}"
            ),
        );
    }
    team.join(&symmetric, "symsp", 0);
    team.join(&cone, "prcn", 0);
    team.join(&newcomer, "fcn", 0);
    // The ID goes to the extra port at once and is resent until echoed.
    std::thread::sleep(Duration::from_secs(3));
    let split = team.splitter_status();
    let nts = &split["nts"];
    let to_extra =
        |h: &Home| counter_packets(&nft_list(&h.nat.netns, &["chain", "ip", "u2x", "forward"]));
    let (from_symmetric, from_cone) = (to_extra(&symmetric), to_extra(&cone));
    let member = member_at(&split, symmetric.nat.wan);
    let metrics = natlab::http_get_in(&team.public, METRICS_PORT, "/metrics")
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let metric = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
    };
    eprintln!(
        "splitter: extra port {} at start, {} now; {} U2x sent, {} IDs at the extra port, {} ignored; symsp member step {}; to extra ports: symsp {from_symmetric}, prcn {from_cone}; {:.1?}",
        team.extra_port,
        nts["extra_port"],
        nts["u2x_sent"],
        nts["extra_seen"],
        nts["extra_ignored"],
        member["port_step"],
        started.elapsed()
    );
    // The symmetric member was told of two newcomers (prcn and fcn), each with U2x.
    assert_eq!(nts["u2x_sent"], 2, "{nts}");
    assert_eq!(metric("p2psp_splitter_nts_u2x_total"), Some(2));
    let seen = nts["extra_seen"].as_u64().unwrap_or(0);
    assert!(seen >= 2, "{nts}");
    assert_eq!(metric("p2psp_splitter_nts_extra_ids_total"), Some(seen));
    assert_eq!(nts["extra_ignored"], 0);
    // Echoed: one ID per U2x, perhaps one early repeat each, no more.
    assert!(
        (2..=4).contains(&from_symmetric),
        "{from_symmetric} datagrams from the symmetric member to extra ports"
    );
    assert_eq!(from_cone, 0, "a cone member got U2x");
    assert_ne!(
        nts["extra_port"], team.extra_port,
        "the extra port was not renewed"
    );
    // The samples agree with the NAT's sequential step (1 in the lab).
    assert_eq!(member["port_step"], 1, "{member}");
    drop(team);
    drop(lab);
}
