//! The library's error type and the checks made before a lab is built.

use std::path::PathBuf;

/// What can go wrong building or running a lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system tool the lab needs is not installed.
    #[error("natcall-lab needs {tool} (Debian package {package}): install it with `apt-get install {package}`")]
    MissingTool {
        /// The command.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// Neither root nor an unprivileged user namespace is available.
    #[error("natcall-lab needs root, or unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1): {0}")]
    Privileges(String),
    /// A natcall binary was not found.
    #[error("{} is missing: run `cargo build --workspace --bins` first (or pass --bin-dir)", .0.display())]
    MissingBinary(PathBuf),
    /// patchbay could not build the topology.
    #[error("building the lab: {0:#}")]
    Lab(anyhow::Error),
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A command run inside a namespace failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A kind name that does not exist.
    #[error(
        "unknown kind {0:?}: expected public, full-cone, address-restricted, port-restricted, symmetric, cgnat, udp-blocked or same-lan"
    )]
    UnknownKind(String),
    /// A scenario that cannot be built (e.g. same-lan with another kind).
    #[error("invalid scenario: {0}")]
    InvalidScenario(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// Where a command is found: `$PATH`, then the sbin directories (often not in a user's PATH).
pub(crate) fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Checks what the lab needs before it builds anything: `nft`, `tc` and `ip`, and root or a
/// user namespace. The message says what to install.
pub fn preflight() -> Result<(), Error> {
    for (tool, package) in [("nft", "nftables"), ("tc", "iproute2"), ("ip", "iproute2")] {
        if find_tool(tool).is_none() {
            return Err(Error::MissingTool { tool, package });
        }
    }
    patchbay::check_caps().map_err(|e| Error::Privileges(format!("{e:#}")))
}
