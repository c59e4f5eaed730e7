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
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_addr)]
    pub metrics: Option<SocketAddr>,
}
