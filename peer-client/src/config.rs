//! Where to find the server, who we are, and our identity: flags, then `config.toml` in the
//! home directory, then defaults.
//!
//! ```toml
//! server = "rendezvous.example.net:3478"
//! name = "alice"
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use natcall::{Contacts, Identity};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: Option<String>,
    name: Option<String>,
}

/// Everything a session needs to register.
#[derive(Debug)]
pub struct Settings {
    pub server: SocketAddr,
    pub name: String,
    pub identity: Identity,
    /// The keys met before, for names on this server (scoped by the server as given).
    pub contacts: Contacts,
}

const DEFAULT_SERVER: &str = "127.0.0.1:3478";

impl Settings {
    pub async fn resolve(server: Option<String>, name: Option<String>, home: Option<PathBuf>) -> Result<Self> {
        let home = home
            .or_else(Identity::default_dir)
            .context("no home directory for the identity: set --home or NATCALL_HOME")?;
        let file_path = home.join("config.toml");
        let file: File = match std::fs::read_to_string(&file_path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("invalid {}", file_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", file_path.display())),
        };
        let server = server.or(file.server).unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let name = match name.or(file.name).or_else(|| std::env::var("USER").ok()) {
            Some(n) => n,
            None => bail!("no name: pass --name or set name in {}", file_path.display()),
        };
        natcall::validate_name(&name).with_context(|| format!("invalid name {name:?}"))?;
        let addr = tokio::net::lookup_host(&server)
            .await
            .with_context(|| format!("cannot resolve rendezvous server {server:?} (expected HOST:PORT)"))?
            .next()
            .with_context(|| format!("rendezvous server {server:?} has no address"))?;
        let identity = Identity::load_or_create(&home)?;
        Ok(Self {
            server: addr,
            name,
            identity,
            contacts: Contacts::in_dir(&home, server),
        })
    }
}
