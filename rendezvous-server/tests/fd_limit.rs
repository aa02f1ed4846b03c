//! The process runs out of file descriptors: the server still answers "server full" and goes
//! on accepting once descriptors are free again. Alone in its own test binary, because it
//! lowers the whole process's open-file limit.

mod common;

use std::fs::File;

use common::{Client, Identity, Running, test_config};
use natcall_proto::frame::ErrorCode;
use rlimit::Resource;

#[tokio::test(flavor = "current_thread")]
async fn out_of_descriptors_a_client_is_told_server_full_and_later_ones_are_served() {
    let srv = Running::start(test_config()).await;
    drop(Client::hello(srv.addr).await); // the accept loop runs (and holds its reserve)
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).expect("reads the limit");
    let open = std::fs::read_dir("/proc/self/fd").expect("lists fds").count() as u64;
    rlimit::setrlimit(Resource::NOFILE, open + 32, hard).expect("lowers the limit");
    let mut hog = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        hog.push(f);
    }
    hog.pop(); // exactly one descriptor free: the client's socket takes it, the server has none

    let mut c = Client::connect(srv.addr).await;
    let e = c.expect_error().await;
    assert_eq!(e.code, ErrorCode::ServerFull);
    assert_eq!(
        e.message,
        "server full: the server is out of file descriptors; try later"
    );
    c.expect_eof().await;
    drop(c);
    let refused = srv
        .server
        .metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("natcall_refused_total{reason=\"fd_limit\"}"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("the fd_limit refusal is counted");
    assert!(refused >= 1.0, "{refused}");

    drop(hog);
    rlimit::setrlimit(Resource::NOFILE, soft, hard).expect("restores the limit");
    Client::register(srv.addr, "alice", &Identity::generate()).await;
    srv.shutdown().await;
}
