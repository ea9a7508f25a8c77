//! Private broker processes for the tests that need a server the machine
//! does not run: a tansu Kafka-protocol broker and a moto SQS/SNS
//! emulator, each on a free port and killed when dropped. A missing binary
//! fails the test, naming what to install (`cargo xtask test` installs
//! both).

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// tansu (`SLUICE_TANSU` or `tansu` on `PATH`), keeping messages in
    /// memory.
    pub fn tansu() -> Server {
        Server::tansu_with(&[])
    }

    /// tansu with more arguments to `tansu broker`.
    pub fn tansu_with(extra: &[&str]) -> Server {
        Server::kafka_broker("tansu", "SLUICE_TANSU", extra)
    }

    /// nisshi, tansu's later releases under a new name (`SLUICE_NISSHI` or
    /// `nisshi` on `PATH`), keeping messages in memory. Only for what tansu
    /// 0.6.0 gets wrong: a member whose session lapsed leaves its
    /// partitions to no one until another member joins or leaves. The
    /// other Kafka tests stay on tansu: this 0.7.0 pre-release is slow to
    /// let a new group's first member through its join (JoinGroup again
    /// and again, no SyncGroup), which fails tests that wait for a new
    /// group's first message.
    pub fn nisshi() -> Server {
        Server::kafka_broker("nisshi", "SLUICE_NISSHI", &[])
    }

    /// A tansu-like broker `program` (or the binary `variable` names), its
    /// log in memory.
    fn kafka_broker(program: &str, variable: &str, extra: &[&str]) -> Server {
        let binary = std::env::var_os(variable).unwrap_or_else(|| program.into());
        Server::start(program, answers_api_versions, |port| {
            let listener = format!("tcp://127.0.0.1:{port}");
            let mut command = Command::new(&binary);
            command
                .args(["broker", "--listener-url", &listener])
                .args(["--advertised-listener-url", &listener])
                .args(["--storage-engine", "memory://tansu/"])
                .args(extra);
            command
        })
    }

    /// moto's server (`moto_server`, from PyPI's `moto[server]`).
    pub fn moto() -> Server {
        Server::start(
            "moto_server",
            |port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            |port| {
                let mut command = Command::new("moto_server");
                command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                command
            },
        )
    }

    /// A `kafka://` URL on this broker.
    pub fn kafka_url(&self, query: &str) -> String {
        format!("kafka://127.0.0.1:{}{query}", self.port)
    }

    /// An `sqs://` or `sns+sqs://` URL on this emulator; `key` picks the
    /// (static) credentials, which also tell backend handles apart as if
    /// in other processes.
    /// With one-second long polls: moto busy-waits a FIFO long poll while
    /// one of the queue's message groups is in flight, which slowed every
    /// other call until leases ran out under live consumers.
    pub fn aws_url(&self, scheme: &str, key: &str, params: &str) -> String {
        format!(
            "{scheme}://{key}:secret@127.0.0.1:{}?region=us-east-1&wait_s=1{params}",
            self.port
        )
    }

    fn start(name: &str, ready: fn(u16) -> bool, command: impl Fn(u16) -> Command) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = command(port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {name} ({e}); `cargo xtask test` installs it")
            });
        let server = Server { child, port };
        let give_up = Instant::now() + Duration::from_secs(30);
        while !ready(port) {
            assert!(
                Instant::now() < give_up,
                "{name} did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a Kafka broker answers an ApiVersions request (v0) on the port.
fn answers_api_versions(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    // Length 10; api key 18 (ApiVersions), version 0, correlation id 7, no
    // client id.
    let request = [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 7, 0xff, 0xff];
    let mut header = [0u8; 8];
    stream.write_all(&request).is_ok()
        && stream.read_exact(&mut header).is_ok()
        && header[4..8] == [0, 0, 0, 7]
}
