//! What [`RecvPath`](super::RecvPath) and [`SendPath`](super::SendPath) share: the choice between
//! io_uring and one fallback system call, detected once per process, named, and parsed back.

/// Writes `detect` (probed once per process with `$supported`), `name`, `Display` and `FromStr`
/// for a kernel-path enum whose variants are `Uring` and `$fallback`.
///
/// `names:` gives the fallback's name (what `name` and `Display` write, and what the parse error
/// suggests) and any aliases `FromStr` also accepts; `"io_uring"` and `"uring"` always parse as
/// `Uring`. `$what` names the path in the parse error (`unknown $what path ...`). The doc comment
/// given last becomes `detect`'s.
macro_rules! kernel_path {
    (
        $ty:ident, $fallback:ident, $what:literal, $supported:path,
        names: $name:literal $(| $alias:literal)*;
        $(#[$detect_doc:meta])*
    ) => {
        impl $ty {
            $(#[$detect_doc])*
            pub fn detect() -> $ty {
                static DETECTED: std::sync::OnceLock<$ty> = std::sync::OnceLock::new();
                *DETECTED.get_or_init(|| {
                    if $supported() {
                        $ty::Uring
                    } else {
                        $ty::$fallback
                    }
                })
            }

            #[doc = concat!(
                "`\"io_uring\"` or `\"", $name,
                "\"` (accepted back by [`FromStr`](std::str::FromStr))."
            )]
            pub fn name(self) -> &'static str {
                match self {
                    $ty::Uring => "io_uring",
                    $ty::$fallback => $name,
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;

            #[doc = concat!(
                "`\"io_uring\"` or `\"uring\"`, `\"", $name, "\"`",
                $(" or `\"", $alias, "\"`",)*
                " (ASCII case ignored)."
            )]
            fn from_str(s: &str) -> Result<$ty, String> {
                match s.to_ascii_lowercase().as_str() {
                    "io_uring" | "uring" => Ok($ty::Uring),
                    $name $(| $alias)* => Ok($ty::$fallback),
                    _ => Err(format!(
                        concat!(
                            "unknown ", $what, " path {:?}: expected \"io_uring\" (or \"uring\") ",
                            "or \"", $name, "\""
                        ),
                        s
                    )),
                }
            }
        }
    };
}

pub(crate) use kernel_path;
