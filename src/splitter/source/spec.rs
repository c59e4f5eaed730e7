//! `--source` values: [`SourceSpec`], and the [`HttpUrl`] of an HTTP source.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use thiserror::Error;

/// What `--source` names: `test`, `-` (stdin) or `http://host[:port]/mount`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// `test`: the deterministic [`pattern`](crate::pattern) stream, paced at the configured bitrate.
    Test,
    /// `-`: standard input, read as it comes.
    Stdin,
    /// `http://host[:port]/mount`: a live HTTP stream (Icecast, a media server...).
    Http(HttpUrl),
}

/// An `http://` URL, reduced to what a GET request needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host name or IP address (an IPv6 address without its brackets).
    pub host: String,
    /// TCP port, 80 unless the URL names one.
    pub port: u16,
    /// Request target: the path, starting with `/`, and the query if any.
    pub path: String,
}

/// Why a `--source` value is not usable. The user's input is at fault; the message says how.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SpecError {
    /// An `https://` URL: TLS is not supported.
    #[error(
        "https is not supported in {url:?}: give an http:// URL (a local TLS-terminating proxy can \
         front an https source)"
    )]
    Https {
        /// The value given.
        url: String,
    },
    /// A URL with a scheme other than `http`.
    #[error("unsupported URL scheme {scheme:?} in {url:?}: only http:// is supported")]
    UnsupportedScheme {
        /// The scheme, as given.
        scheme: String,
        /// The value given.
        url: String,
    },
    /// Neither `test`, `-` nor a URL.
    #[error("unknown source {given:?}: expected `test`, `-` (stdin) or `http://host[:port]/mount`")]
    Unknown {
        /// The value given.
        given: String,
    },
    /// No host between `http://` and the path.
    #[error("missing host in {url:?}: expected `http://host[:port]/mount`")]
    MissingHost {
        /// The value given.
        url: String,
    },
    /// The host has characters a host name or IP address cannot have.
    #[error("invalid host {host:?} in {url:?}")]
    BadHost {
        /// The host, as given.
        host: String,
        /// The value given.
        url: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error("invalid port {port:?} in {url:?}: expected a number from 1 to 65535")]
    BadPort {
        /// The port, as given.
        port: String,
        /// The value given.
        url: String,
    },
    /// `user:password@` in the URL.
    #[error("credentials in the source URL are not supported: {url:?}")]
    Credentials {
        /// The value given.
        url: String,
    },
    /// Whitespace or control characters in the path.
    #[error(
        "invalid character in the path of {url:?}: percent-encode spaces and control characters"
    )]
    BadPath {
        /// The value given.
        url: String,
    },
}

impl FromStr for SourceSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "test" => return Ok(Self::Test),
            "-" => return Ok(Self::Stdin),
            _ => {}
        }
        let Some((scheme, _)) = s.split_once("://") else {
            return Err(SpecError::Unknown {
                given: s.to_owned(),
            });
        };
        if scheme.eq_ignore_ascii_case("http") {
            s.parse().map(Self::Http)
        } else if scheme.eq_ignore_ascii_case("https") {
            Err(SpecError::Https { url: s.to_owned() })
        } else {
            Err(SpecError::UnsupportedScheme {
                scheme: scheme.to_owned(),
                url: s.to_owned(),
            })
        }
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Test => f.write_str("test"),
            Self::Stdin => f.write_str("-"),
            Self::Http(url) => url.fmt(f),
        }
    }
}

impl FromStr for HttpUrl {
    type Err = SpecError;

    /// Parses `http://host[:port][/path][?query][#fragment]`; the fragment is dropped, an empty
    /// path becomes `/`.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let url = || s.to_owned();
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(SpecError::Https { url: url() });
            }
            Some((scheme, _)) => {
                return Err(SpecError::UnsupportedScheme {
                    scheme: scheme.to_owned(),
                    url: url(),
                });
            }
            None => return Err(SpecError::Unknown { given: url() }),
        };
        let rest = rest.split('#').next().unwrap_or("");
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(SpecError::Credentials { url: url() });
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(SpecError::BadHost {
                    host: authority.to_owned(),
                    url: url(),
                });
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(SpecError::BadHost {
                    host: host.to_owned(),
                    url: url(),
                });
            }
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => {
                        return Err(SpecError::BadHost {
                            host: authority.to_owned(),
                            url: url(),
                        });
                    }
                },
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(SpecError::MissingHost { url: url() });
        }
        let host_ok = host.contains(':')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !host_ok {
            return Err(SpecError::BadHost {
                host: host.to_owned(),
                url: url(),
            });
        }
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Err(SpecError::BadPort {
                        port: p.to_owned(),
                        url: url(),
                    });
                }
            },
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(SpecError::BadPath { url: url() });
        }
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            path,
        })
    }
}

impl HttpUrl {
    /// The `Host` header value: `host`, or `host:port` when the port is not 80 (IPv6 bracketed).
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.host_header(), self.path)
    }
}
