//! `natcall netcheck` against a tool we did not write: behind every NAT kind the lab builds,
//! our client against our server, coturn's `turnutils_natdiscovery` against our server, and our
//! client against coturn's `turnserver` must all see the mapping and filtering the lab built.
//!
//! Needs root, `nft`, `ip`, coturn (`turnserver`, `turnutils_natdiscovery`) and the workspace
//! binaries (`tests/run-all.sh` installs and builds them).

use natcall_lab::{Binaries, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcheck_natdiscovery_and_coturn_agree_with_every_kind_the_lab_builds() {
    if let Err(e) = natcall_lab::preflight() {
        panic!("{e}");
    }
    for tool in ["turnserver", "turnutils_natdiscovery"] {
        assert!(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is missing: apt-get install coturn"
        );
    }
    let bins = Binaries::locate(None).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = natcall_lab::netcheck::run(&bins, &Kind::ALL, 3, dir.path()).await;
    let table = natcall_lab::netcheck::table(&rows);
    for row in &rows {
        assert_eq!(row.error, None, "{}: {table}", row.kind);
        assert!(row.agrees(), "{} disagrees:\n{table}", row.kind);
    }
    // The table distinguishes every behaviour the lab has: it would catch a tool that says the
    // same thing everywhere.
    let seen: std::collections::HashSet<String> = rows.iter().map(|r| r.expected.short()).collect();
    assert_eq!(seen.len(), 5, "{table}");
    // netcheck finds the port mapping protocols where miniupnpd runs, and only there.
    for row in &rows {
        let expected = match row.kind {
            Kind::SymmetricUpnp => "UPnP-IGD, NAT-PMP, PCP",
            Kind::UdpBlocked => "-", // no UDP: the report stops before
            _ => "none",
        };
        assert_eq!(
            row.port_mapping.as_deref().unwrap_or("-"),
            expected,
            "{}:\n{table}",
            row.kind
        );
    }
}
