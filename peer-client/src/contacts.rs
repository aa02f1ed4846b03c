//! `natcall contacts` and `natcall verify NAME`: the keys this peer has met (trust on first use,
//! kept in `contacts.toml` in the home directory, see [`natcall::Contacts`]), and the safety
//! number two peers read to each other to check them.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use natcall::{Contact, Contacts, Fingerprint, Identity, SafetyNumber, format_time};
use serde_json::json;

use crate::config::Settings;
use crate::output::{self, Exit};

/// What to do with the contacts.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ContactsCmd {
    /// List the contacts (the default): server, name, key, how it was trusted, first and last seen.
    List,
    /// Trust FINGERPRINT as NAME's key on this server (after a refused key change, once you
    /// compared safety numbers with `natcall verify NAME --key FINGERPRINT`).
    Accept {
        /// The peer's name.
        name: String,
        /// The new key: 64 hex digits, as the key-change warning prints it.
        fingerprint: Fingerprint,
    },
    /// Forget NAME on this server: the next call with that name is a first contact again.
    Forget {
        /// The peer's name.
        name: String,
    },
}

/// `natcall contacts [list]`: needs only the home directory (no server, no name).
pub fn list(home: Option<PathBuf>, json: bool) -> Result<Exit> {
    let home = home
        .or_else(Identity::default_dir)
        .context("no home directory: set --home or NATCALL_HOME")?;
    // Every server's contacts: the server only scopes changes.
    print_list(&Contacts::in_dir(&home, ""), json)
}

fn print_list(contacts: &Contacts, json: bool) -> Result<Exit> {
    let all = contacts.list()?;
    if json {
        for c in &all {
            output::line(&contact_json("contact", c));
        }
        return Ok(Exit::Ok);
    }
    if all.is_empty() {
        eprintln!(
            "no contacts yet ({} is created by your first call)",
            contacts.path().display()
        );
        return Ok(Exit::Ok);
    }
    let width = |f: fn(&Contact) -> usize, title: &str| all.iter().map(f).max().unwrap_or(0).max(title.len());
    let (sw, nw) = (width(|c| c.server.len(), "SERVER"), width(|c| c.name.len(), "NAME"));
    println!(
        "{:sw$}  {:nw$}  {:8}  {:9}  {:23}  LAST SEEN",
        "SERVER", "NAME", "KEY", "TRUST", "FIRST SEEN"
    );
    for c in &all {
        println!(
            "{:sw$}  {:nw$}  {:8}  {:9}  {:23}  {}",
            c.server,
            c.name,
            c.fingerprint.short(),
            c.trust.to_string(),
            format_time(c.first_seen),
            format_time(c.last_seen),
        );
    }
    Ok(Exit::Ok)
}

/// `natcall contacts accept|forget` (and `list`, with the settings already resolved).
pub fn change(settings: &Settings, cmd: ContactsCmd, json: bool) -> Result<Exit> {
    let contacts = &settings.contacts;
    let server = contacts.server();
    match cmd {
        ContactsCmd::List => return print_list(contacts, json),
        ContactsCmd::Accept { name, fingerprint } => {
            natcall::validate_name(&name).with_context(|| format!("invalid name {name:?}"))?;
            let old = contacts.accept(&name, fingerprint, SystemTime::now())?;
            let replaced = old.as_ref().map(|o| o.fingerprint.to_string());
            let text = match &old {
                Some(o) if o.fingerprint == fingerprint => {
                    format!("{name} on {server} already had key {fingerprint}: now marked accepted")
                }
                Some(o) => format!(
                    "accepted key {fingerprint} for {name} on {server} (replaces {})",
                    o.fingerprint.short()
                ),
                None => format!("accepted key {fingerprint} for {name} on {server}"),
            };
            let event = json!({"event": "accepted", "server": server, "name": name,
                "fingerprint": fingerprint.to_string(), "replaced": replaced});
            output::notice(json, event, &text);
        }
        ContactsCmd::Forget { name } => {
            let Some(old) = contacts.forget(&name)? else {
                bail!("{name} is not in your contacts on {server} (see `natcall contacts`)");
            };
            let text = format!("forgot {name} on {server} (key {})", old.fingerprint.short());
            output::notice(json, contact_json("forgotten", &old), &text);
        }
    }
    Ok(Exit::Ok)
}

/// `natcall verify NAME [--key FINGERPRINT]`.
pub fn verify(settings: &Settings, peer: &str, key: Option<Fingerprint>, json: bool) -> Result<Exit> {
    let contacts = &settings.contacts;
    let stored = contacts.get(peer)?;
    let Some(theirs) = key.or(stored.as_ref().map(|c| c.fingerprint)) else {
        bail!(
            "you have not met {peer} on {} yet: call them first, or give the key they read to you with --key",
            contacts.server()
        );
    };
    let mine = settings.identity.fingerprint();
    let me = settings.name.as_str();
    let number = SafetyNumber::new((me, mine), (peer, theirs));
    let note = match &stored {
        Some(c) if c.fingerprint == theirs => format!(
            "the key in your contacts ({}, first seen {})",
            c.trust,
            format_time(c.first_seen)
        ),
        Some(c) => format!(
            "not the key in your contacts ({}): accept it with `natcall contacts accept {peer} {theirs}` once the numbers match",
            c.fingerprint.short()
        ),
        None => format!("not in your contacts yet: `natcall contacts accept {peer} {theirs}` once the numbers match"),
    };
    if json {
        output::line(&json!({
            "event": "safety_number", "server": contacts.server(), "name": me, "peer": peer,
            "safety_number": number.to_string(), "fingerprint": mine.to_string(),
            "peer_fingerprint": theirs.to_string(), "stored": stored.as_ref().map(|c| c.fingerprint == theirs),
        }));
        return Ok(Exit::Ok);
    }
    let groups: Vec<&str> = number.groups().collect();
    println!("safety number of {me} and {peer} on {}:", contacts.server());
    for row in groups.chunks(4) {
        println!("    {}", row.join(" "));
    }
    let (yours, their) = ("your key:".to_owned(), format!("{peer}'s key:"));
    let w = yours.len().max(their.len());
    println!("{yours:w$} {mine}");
    println!("{their:w$} {theirs}");
    println!("  ({note})");
    println!(
        "Read the number to {peer} in person or by phone while they run `natcall verify {me}`: if both show the same digits, each of you has the other's real key."
    );
    Ok(Exit::Ok)
}

/// `{"event": EVENT, "server", "name", "fingerprint", "short", "trust", "first_seen", "last_seen"}`
/// (times in RFC 3339).
fn contact_json(event: &str, c: &Contact) -> serde_json::Value {
    let mut v = serde_json::to_value(c).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("event".into(), json!(event));
        o.insert("short".into(), json!(c.fingerprint.short()));
    }
    v
}
