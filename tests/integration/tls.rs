//! TLS and credentials against private servers that require them, each
//! started by its test on a free port, with a CA and certificates the test
//! makes: Redis (`rediss://` with a client certificate and an ACL user),
//! NATS (TLS with a client certificate; user and password, nkey, token and
//! a creds file), PostgreSQL (`sslmode=verify-full` with a client
//! certificate), Kafka on tansu (SASL refusals, files that cannot be read)
//! and SQS credentials from the AWS chain against moto. A wrong CA, an
//! expired certificate and a wrong password each fail at connect with one
//! line that names the cause.
use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::free_port;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use sluice::Message;
use sluice::backend::{self, SubscribeOptions};
use sluice_tests::common;

/// A private CA in a temporary directory, and the certificates it issues.
struct Pki {
    dir: tempfile::TempDir,
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            ca: Issuer::new(params, key),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues `NAME.pem` and `NAME.key` for localhost and 127.0.0.1, with
    /// common name `cn`; an expired one ended in 2021.
    fn issue(&self, name: &str, cn: &str, server: bool, expired: bool) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        fs::write(&cert_path, cert.pem()).unwrap();
        fs::write(&key_path, key.serialize_pem()).unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
        (cert_path, key_path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A server process of a test, stopped when dropped; its output goes to a
/// log file that is shown if it does not come up.
struct Process {
    child: Child,
    log: PathBuf,
    /// Stopped with SIGINT, so it takes its own children down.
    graceful: bool,
}

impl Process {
    fn start(mut command: Command, log: PathBuf, graceful: bool) -> Process {
        let out = fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Process {
            child,
            log,
            graceful,
        }
    }

    /// Waits until the server accepts TCP connections on `port`.
    fn wait_for_port(&mut self, port: u16) {
        let give_up = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = || fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the server exited ({status}):\n{}", log());
            }
            assert!(
                Instant::now() < give_up,
                "the server did not listen on {port}:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.graceful {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            let give_up = Instant::now() + Duration::from_secs(10);
            while Instant::now() < give_up {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

/// Connects through `sluice::backend::connect`, subscribes, publishes one
/// message and receives it.
async fn round_trip(url: &str) -> Result<()> {
    let backend = backend::connect(url).await?;
    let topic = "tls.check";
    let mut options = SubscribeOptions::new(vec![topic.to_string()], "tls-check");
    options.lease = Duration::from_secs(10);
    let subscription = backend.subscribe(options).await?;
    backend
        .publish(vec![Message::new(topic, b"over tls".to_vec())])
        .await?;
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        ensure!(Instant::now() < give_up, "nothing arrived at `{url}`");
        let deliveries = subscription.fetch(10, Duration::from_millis(500)).await?;
        if let Some(delivery) = deliveries.first() {
            ensure!(delivery.message.payload == b"over tls", "wrong payload");
            subscription.ack(delivery).await?;
            break;
        }
    }
    subscription.close().await?;
    Ok(())
}

/// The error of connecting to `url`, as the CLI prints it: one line that
/// names every word of `causes` (case aside).
async fn refused(url: &str, causes: &[&str]) -> String {
    let error = match backend::connect(url).await {
        Ok(_) => panic!("connecting to `{url}` worked; expected an error naming {causes:?}"),
        Err(error) => format!("{error:#}"),
    };
    eprintln!("refused as expected: {error}");
    assert!(!error.contains('\n'), "more than one line: {error}");
    for cause in causes {
        assert!(
            error.to_lowercase().contains(&cause.to_lowercase()),
            "`{error}` does not name {cause:?}"
        );
    }
    error
}

// ---------------------------------------------------------------- Redis

/// A private `redis-server` listening only for TLS, with client
/// certificates required and one ACL user, `app` / `s3cret`.
fn redis_server(pki: &Pki, cert: &(PathBuf, PathBuf)) -> (Process, u16) {
    let port = free_port();
    let data = pki.path(&format!("redis-{port}"));
    fs::create_dir(&data).unwrap();
    let conf = data.join("redis.conf");
    fs::write(
        &conf,
        format!(
            "port 0\nbind 127.0.0.1\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
             tls-ca-cert-file {}\ntls-auth-clients yes\nsave \"\"\nappendonly no\ndir {}\n\
             user default off\nuser app on >s3cret ~* &* +@all\n",
            show(&cert.0),
            show(&cert.1),
            show(&pki.ca()),
            show(&data),
        ),
    )
    .unwrap();
    let mut command = Command::new("redis-server");
    command.arg(&conf);
    let mut server = Process::start(command, data.join("log"), false);
    server.wait_for_port(port);
    (server, port)
}

#[tokio::test]
async fn redis_over_tls_with_a_client_certificate_and_an_acl_user() {
    let pki = Pki::new("redis");
    let server_cert = pki.issue("server", "localhost", true, false);
    let (client, key) = pki.issue("client", "app", false, false);
    let (_server, port) = redis_server(&pki, &server_cert);
    let files = format!(
        "ca={}&cert={}&key={}",
        show(&pki.ca()),
        show(&client),
        show(&key)
    );
    for scheme in ["rediss", "rediss+pubsub"] {
        round_trip(&format!(
            "{scheme}://app:s3cret@localhost:{port}/0?{files}&prefix=tls:"
        ))
        .await
        .unwrap_or_else(|e| panic!("{scheme}: {e:#}"));
    }
    // The address by IP, which the certificate also names.
    round_trip(&format!("rediss://app:s3cret@127.0.0.1:{port}?{files}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn redis_refusals_are_one_clear_line() {
    let pki = Pki::new("redis");
    let (client, key) = pki.issue("client", "app", false, false);
    let good = pki.issue("server", "localhost", true, false);
    let expired = pki.issue("expired", "localhost", true, true);
    let (_server, port) = redis_server(&pki, &good);
    let (_old, old_port) = redis_server(&pki, &expired);
    let client_files = format!("cert={}&key={}", show(&client), show(&key));
    let ca = show(&pki.ca());

    let stranger = Pki::new("stranger");
    let error = refused(
        &format!(
            "rediss://app:s3cret@localhost:{port}?ca={}&{client_files}",
            show(&stranger.ca())
        ),
        &["certificate"],
    )
    .await;
    assert!(error.contains("UnknownIssuer"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");

    refused(
        &format!("rediss://app:s3cret@localhost:{old_port}?ca={ca}&{client_files}"),
        &["certificate", "expired"],
    )
    .await;

    let error = refused(
        &format!("rediss://app:wrong@localhost:{port}?ca={ca}&{client_files}"),
        &["password"],
    )
    .await;
    assert!(!error.contains("wrong"), "{error}");

    refused(
        &format!("rediss://app:s3cret@localhost:{port}?ca={ca}&cert=/nonexistent/c.pem&key=/k"),
        &["cert file", "/nonexistent/c.pem"],
    )
    .await;
    refused(
        &format!("redis://localhost:{port}?ca={ca}"),
        &["`ca` is a TLS parameter", "rediss://"],
    )
    .await;
    refused(
        &format!("rediss://localhost:{port}?ca={ca}&cert={}", show(&client)),
        &["both `cert` and `key`"],
    )
    .await;
}

// ----------------------------------------------------------------- NATS

/// A private `nats-server` that requires TLS with a client certificate;
/// `auth` is the rest of its configuration (who may connect).
fn nats_server(pki: &Pki, cert: &(PathBuf, PathBuf), auth: &str) -> (Process, u16) {
    let port = free_port();
    let data = pki.path(&format!("nats-{port}"));
    fs::create_dir(&data).unwrap();
    let conf = data.join("nats.conf");
    fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:{port}\"\n\
             tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}\n\
             {auth}\n",
            show(&cert.0),
            show(&cert.1),
            show(&pki.ca()),
        )
        .replace("$DATA", &show(&data)),
    )
    .unwrap();
    let mut command = Command::new("nats-server");
    command.arg("-c").arg(&conf);
    let mut server = Process::start(command, data.join("log"), false);
    server.wait_for_port(port);
    (server, port)
}

/// URL-safe base64 without padding, as JWTs use.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | ((*b as u32) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A NATS JWT: `claims` about `subject`, signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = serde_json::json!({
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    claims["jti"] = hex::encode_upper(Sha256::digest(claims.to_string().as_bytes())).into();
    let signed = format!(
        "{}.{}",
        base64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        base64url(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", base64url(&signature))
}

/// An operator, an account and a user of it: the server's configuration
/// (operator mode, the account preloaded) and the user's `.creds` file.
fn nats_operator(dir: &Path) -> (String, PathBuf) {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "sluice-test",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "app",
        serde_json::json!({
            "limits": unlimited,
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": 2,
        }),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "app",
        serde_json::json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        }),
    );
    let operator_file = dir.join("operator.jwt");
    fs::write(&operator_file, &operator_jwt).unwrap();
    let creds = dir.join("app.creds");
    fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let config = format!(
        "operator: \"{}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{account_jwt}\"\n}}",
        show(&operator_file),
        account.public_key()
    );
    (config, creds)
}

#[tokio::test]
async fn nats_over_tls_with_each_kind_of_credential() {
    let pki = Pki::new("nats");
    let server_cert = pki.issue("server", "localhost", true, false);
    let (client, key) = pki.issue("client", "app", false, false);
    let tls = format!(
        "ca={}&cert={}&key={}",
        show(&pki.ca()),
        show(&client),
        show(&key)
    );

    let user = nkeys::KeyPair::new_user();
    let seed = pki.path("app.nk");
    fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
    let (_users, port) = nats_server(
        &pki,
        &server_cert,
        &format!(
            "jetstream {{ store_dir: \"$DATA\" }}\n\
             authorization {{ users: [ {{ user: app, password: s3cret }}, {{ nkey: {} }} ] }}",
            user.public_key()
        ),
    );
    round_trip(&format!("nats://app:s3cret@localhost:{port}?{tls}"))
        .await
        .unwrap();
    round_trip(&format!(
        "jetstream://app:s3cret@localhost:{port}?{tls}&storage=memory"
    ))
    .await
    .unwrap();
    round_trip(&format!(
        "nats://127.0.0.1:{port}?{tls}&nkey={}",
        show(&seed)
    ))
    .await
    .unwrap();

    let (_token, port) = nats_server(&pki, &server_cert, "authorization { token: \"t0k3n\" }");
    round_trip(&format!(
        "nats://localhost:{port}?{tls}&token=t0k3n&tls=true"
    ))
    .await
    .unwrap();

    let (operator, creds) = nats_operator(pki.dir.path());
    let (_operator, port) = nats_server(&pki, &server_cert, &operator);
    round_trip(&format!(
        "nats://localhost:{port}?{tls}&creds={}",
        show(&creds)
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn nats_refusals_are_one_clear_line() {
    let pki = Pki::new("nats");
    let server_cert = pki.issue("server", "localhost", true, false);
    let (client, key) = pki.issue("client", "app", false, false);
    let (old_client, old_key) = pki.issue("expired", "app", false, true);
    let ca = show(&pki.ca());
    let tls = format!("ca={ca}&cert={}&key={}", show(&client), show(&key));
    let (_server, port) = nats_server(
        &pki,
        &server_cert,
        "authorization { users: [ { user: app, password: s3cret } ] }",
    );

    let stranger = Pki::new("stranger");
    let error = refused(
        &format!(
            "nats://app:s3cret@localhost:{port}?ca={}&cert={}&key={}",
            show(&stranger.ca()),
            show(&client),
            show(&key)
        ),
        &["certificate"],
    )
    .await;
    assert!(!error.contains("s3cret"), "{error}");

    // The server refuses an expired client certificate during the
    // handshake.
    refused(
        &format!(
            "nats://app:s3cret@localhost:{port}?ca={ca}&cert={}&key={}",
            show(&old_client),
            show(&old_key)
        ),
        &["certificate"],
    )
    .await;

    let error = refused(
        &format!("nats://app:wrong@localhost:{port}?{tls}"),
        &["authorization"],
    )
    .await;
    assert!(!error.contains("wrong"), "{error}");

    refused(
        &format!("nats://localhost:{port}?{tls}&token=a&creds=/x"),
        &["at most one of a user and password, creds, nkey and token"],
    )
    .await;
    refused(
        &format!("nats://localhost:{port}?{tls}&creds=/nonexistent/app.creds"),
        &["creds file", "/nonexistent/app.creds"],
    )
    .await;
    let not_seed = pki.path("not-a-seed");
    fs::write(&not_seed, "hello\n").unwrap();
    refused(
        &format!("nats://localhost:{port}?{tls}&nkey={}", show(&not_seed)),
        &["nkey file", "user nkey seed"],
    )
    .await;
}

// ----------------------------------------------------------- PostgreSQL

/// The PostgreSQL server binaries, if installed.
fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("postgres").exists() && bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

/// The uid and gid of the `postgres` user, which the server must run as.
fn postgres_user() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        ensure!(out.status.success(), "no `postgres` user");
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// A private PostgreSQL with `ssl=on` that takes TCP connections only over
/// TLS: user `app` with a client certificate (`cert`), user `pw` with a
/// password (`s3cret`).
fn postgres_server(pki: &Pki, bin: &Path, cert: &(PathBuf, PathBuf)) -> Result<(Process, u16)> {
    use std::os::unix::process::CommandExt;
    let (uid, gid) = postgres_user()?;
    let port = free_port();
    let data = pki.path(&format!("pg-{port}"));
    // The server runs as `postgres` and reads its key and the CA.
    for entry in fs::read_dir(pki.dir.path())? {
        std::os::unix::fs::chown(entry?.path(), Some(uid), Some(gid))?;
    }
    std::os::unix::fs::chown(pki.dir.path(), Some(uid), Some(gid))?;
    let as_postgres = |program: PathBuf| {
        let mut command = Command::new(program);
        command.uid(uid).gid(gid).current_dir(pki.dir.path());
        command
    };
    let out = as_postgres(bin.join("initdb"))
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"])
        .arg(&data)
        .output()?;
    ensure!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all app 127.0.0.1/32 cert\n\
         hostssl all pw 127.0.0.1/32 scram-sha-256\n",
    )?;
    let mut command = as_postgres(bin.join("postgres"));
    command
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(&data)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "ssl=on"])
        .arg("-c")
        .arg(format!("ssl_cert_file={}", show(&cert.0)))
        .arg("-c")
        .arg(format!("ssl_key_file={}", show(&cert.1)))
        .arg("-c")
        .arg(format!("ssl_ca_file={}", show(&pki.ca())))
        .args(["-c", "fsync=off"]);
    let mut server = Process::start(command, pki.path(&format!("pg-{port}.log")), true);
    server.wait_for_port(port);
    let out = as_postgres(bin.join("psql"))
        .arg("-h")
        .arg(&data)
        .args([
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-c", "CREATE ROLE app LOGIN"])
        .args(["-c", "CREATE ROLE pw LOGIN PASSWORD 's3cret'"])
        .args(["-c", "CREATE DATABASE app OWNER app"])
        .output()?;
    ensure!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((server, port))
}

#[tokio::test]
async fn postgres_verify_full_with_a_client_certificate() {
    let Some(bin) = postgres_bin() else {
        eprintln!(
            "skipped: no PostgreSQL server binaries under /usr/lib/postgresql (apt install postgresql)"
        );
        return;
    };
    let pki = Pki::new("postgres");
    let server_cert = pki.issue("server", "localhost", true, false);
    let (client, key) = pki.issue("client", "app", false, false);
    let (old_client, old_key) = pki.issue("expired", "app", false, true);
    let (_server, port) = postgres_server(&pki, &bin, &server_cert)
        .context("starting a private PostgreSQL")
        .unwrap();
    let ca = show(&pki.ca());
    let verify = format!("sslmode=verify-full&sslrootcert={ca}");
    round_trip(&format!(
        "postgres://app@localhost:{port}/app?{verify}&sslcert={}&sslkey={}&schema=tls",
        show(&client),
        show(&key)
    ))
    .await
    .unwrap();

    let stranger = Pki::new("stranger");
    refused(
        &format!(
            "postgres://app@localhost:{port}/app?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            show(&stranger.ca()),
            show(&client),
            show(&key)
        ),
        &["certificate"],
    )
    .await;
    refused(
        &format!(
            "postgres://app@localhost:{port}/app?{verify}&sslcert={}&sslkey={}",
            show(&old_client),
            show(&old_key)
        ),
        &["certificate"],
    )
    .await;
    let error = refused(
        &format!("postgres://pw:wrong@localhost:{port}/app?{verify}"),
        &["password authentication failed"],
    )
    .await;
    assert!(!error.contains("wrong"), "{error}");
    refused(
        &format!(
            "postgres://app@localhost:{port}/app?{verify}&sslcert=/nonexistent/c.pem&sslkey=/k"
        ),
        &["sslcert file", "/nonexistent/c.pem"],
    )
    .await;
}

// ---------------------------------------------------------------- Kafka

/// tansu 0.6 takes `--cert` and `--key` but serves plain TCP all the same,
/// and its in-memory storage keeps no SCRAM credentials, so a broker with
/// `--authentication` refuses every login. What is tested: a refused
/// SASL/SCRAM login and a server certificate from another CA (a private
/// TLS server, Redis here, in place of a broker) are each reported as a
/// refusal with librdkafka's reason, which ends the connect without waiting
/// out `timeout_ms` (a broker that does not answer is reported otherwise),
/// and files that cannot be read and settings librdkafka would refuse are
/// named.
#[cfg(feature = "kafka")]
#[tokio::test]
async fn kafka_security_settings_fail_clearly() {
    let broker = common::servers::Server::tansu_with(&["--authentication"]);
    let error = refused(
        &broker.kafka_url(
            "?security.protocol=sasl_plaintext&sasl.mechanism=SCRAM-SHA-512\
             &sasl.username=app&sasl.password=s3cret&timeout_ms=20000",
        ),
        &["refused this client", "SASL SCRAM authentication failed"],
    )
    .await;
    assert!(!error.contains("s3cret"), "{error}");

    let pki = Pki::new("kafka");
    let (_tls_server, port) = redis_server(&pki, &pki.issue("server", "localhost", true, false));
    let stranger = Pki::new("stranger");
    refused(
        &format!(
            "kafka://127.0.0.1:{port}?security.protocol=ssl&ssl.ca.location={}&timeout_ms=20000",
            show(&stranger.ca())
        ),
        // librdkafka words the handshake part differently from run to run
        // ("SSL handshake failed: …" or an OpenSSL code in state
        // SSL_HANDSHAKE); the cause is the same.
        &["refused this client", "SSL", "certificate verify failed"],
    )
    .await;

    let plain = common::servers::Server::tansu();
    refused(
        &plain.kafka_url("?security.protocol=ssl&ssl.ca.location=/nonexistent/ca.pem"),
        &["ssl.ca.location file", "/nonexistent/ca.pem"],
    )
    .await;
    refused(
        &plain.kafka_url("?rdkafka.ssl.key.location=/nonexistent/c.key"),
        &["ssl.key.location file", "/nonexistent/c.key"],
    )
    .await;
    refused(
        &plain.kafka_url("?sasl.mechanism=GSSAPI"),
        &["sasl.mechanism `GSSAPI` is not one of"],
    )
    .await;
}

// ------------------------------------------------------------------ SQS

/// Runs [`sqs_chain_child`] in a process of its own with `env` (the AWS
/// chain reads the process environment), which connects to `url` and
/// either round-trips a message or expects an error naming `expect`.
#[cfg(feature = "sqs")]
fn sqs_in_child(url: &str, env: &[(&str, String)], expect: &str) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "tls::sqs_chain_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("SLUICE_TLS_SQS_URL", url)
        .env("SLUICE_TLS_SQS_EXPECT", expect)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (name, _) in std::env::vars() {
        if name.starts_with("AWS_") && name != "AWS_EC2_METADATA_DISABLED" {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{url} with {env:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child ran no test"
    );
}

/// Credentials from the AWS chain with an endpoint override: a profile of
/// the shared files (by `AWS_PROFILE` and by the URL's `profile`), the
/// environment, web identity (STS on the emulator), and none at all.
#[cfg(feature = "sqs")]
#[test]
fn sqs_credentials_from_the_aws_chain() {
    let moto = common::servers::Server::moto();
    let url = format!("sqs://127.0.0.1:{}?region=us-east-1", moto.port);
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    let config = dir.path().join("config");
    fs::write(
        &credentials,
        "[ci]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = profile-secret\n",
    )
    .unwrap();
    fs::write(&config, "[profile ci]\nregion = us-east-1\n").unwrap();
    let files = [
        ("AWS_SHARED_CREDENTIALS_FILE", show(&credentials)),
        ("AWS_CONFIG_FILE", show(&config)),
    ];

    let mut by_env = files.to_vec();
    by_env.push(("AWS_PROFILE", "ci".to_string()));
    sqs_in_child(&url, &by_env, "ok");
    sqs_in_child(&format!("{url}&profile=ci"), &files, "ok");
    sqs_in_child(
        &format!("{url}&profile=nobody"),
        &files,
        "no AWS credentials",
    );

    sqs_in_child(
        &url,
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDENV".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "env-secret".to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_string()),
            ("AWS_CONFIG_FILE", "/nonexistent".to_string()),
        ],
        "ok",
    );

    let token = dir.path().join("token");
    fs::write(&token, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzbHVpY2UifQ.").unwrap();
    sqs_in_child(
        &url,
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", show(&token)),
            (
                "AWS_ROLE_ARN",
                "arn:aws:iam::123456789012:role/sluice".to_string(),
            ),
            ("AWS_ROLE_SESSION_NAME", "sluice-test".to_string()),
            (
                "AWS_ENDPOINT_URL_STS",
                format!("http://127.0.0.1:{}", moto.port),
            ),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_string()),
            ("AWS_CONFIG_FILE", "/nonexistent".to_string()),
        ],
        "ok",
    );

    sqs_in_child(
        &url,
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_string()),
            ("AWS_CONFIG_FILE", "/nonexistent".to_string()),
        ],
        "no AWS credentials",
    );
}

/// The child of [`sqs_credentials_from_the_aws_chain`]; does nothing when
/// run on its own.
#[cfg(feature = "sqs")]
#[tokio::test]
#[ignore = "run by sqs_credentials_from_the_aws_chain, in a process with the AWS environment it sets"]
async fn sqs_chain_child() {
    let (Ok(url), Ok(expect)) = (
        std::env::var("SLUICE_TLS_SQS_URL"),
        std::env::var("SLUICE_TLS_SQS_EXPECT"),
    ) else {
        return;
    };
    if expect == "ok" {
        round_trip(&url).await.unwrap();
    } else {
        refused(&url, &[expect.as_str()]).await;
    }
}
