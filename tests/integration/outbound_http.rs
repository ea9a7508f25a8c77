//! Outbound HTTP by grant (`allowed_outbound_hosts`): a plugin reaches the
//! origins it is granted and nothing else. Against HTTP servers the test
//! starts on loopback, each counting the requests it gets: a granted origin
//! answers (Rust, JavaScript and Python plugins); a plugin with no grant, a
//! denied origin and a redirect to one fail in the plugin and reach no
//! server; a server slower than the deadline fails the call as a timeout
//! rather than hanging it; requests in flight stay within the plugin's
//! bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use common::{runtime, settings};
use sluice::Message;
use sluice::runtime::{CallError, Origin, OutboundHttp, Outcome, Plugin, PluginSettings};
use sluice_tests::common;

/// A server on loopback that counts its requests, and the most it had in
/// flight at once.
struct Server {
    address: SocketAddr,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl Server {
    /// Serves `/hello`, `/slow` (10 s), `/busy` (300 ms) and
    /// `/redirect?to=URL` (a 302 to URL).
    async fn start() -> Server {
        let counts = Arc::new(Counts::default());
        let app = Router::new()
            .route("/hello", get(|| async { "hello from the server" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    "too late"
                }),
            )
            .route(
                "/busy",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done"
                }),
            )
            .route(
                "/redirect",
                get(|uri: axum::http::Uri| async move {
                    let to = uri
                        .query()
                        .and_then(|q| q.strip_prefix("to="))
                        .unwrap_or("/");
                    (StatusCode::FOUND, [(header::LOCATION, to.to_string())], "").into_response()
                }),
            )
            .layer(axum::middleware::from_fn_with_state(counts.clone(), count))
            .with_state(counts.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Server { address, counts }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn origin(&self) -> String {
        format!("http://{}", self.address)
    }

    fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }
}

async fn count(
    State(counts): State<Arc<Counts>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    counts.requests.fetch_add(1, Ordering::SeqCst);
    let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    counts.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let response = next.run(request).await;
    counts.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

/// The Rust plugin's settings, granted `origins`.
fn granted(origins: &[String], config: &[(&str, &str)]) -> PluginSettings {
    let mut settings = settings("fetch", config);
    settings.outbound_http = Arc::new(OutboundHttp::new(
        origins
            .iter()
            .map(|o| o.parse::<Origin>().unwrap())
            .collect(),
        8,
    ));
    settings
}

fn load(settings: PluginSettings) -> Arc<Plugin> {
    Arc::new(
        runtime()
            .load_file(&common::plugin_path("fetch"), settings)
            .unwrap(),
    )
}

/// What the plugin made of a message whose payload is `url`; a call that
/// does not end within 30 s fails the test as hanging.
async fn fetch(plugin: &Arc<Plugin>, url: &str) -> Result<Outcome, CallError> {
    let mut instance = plugin.instantiate().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        instance.handle(&Message::new("urls", url.to_string()), 1),
    )
    .await
    .expect("the call hung")
}

fn body_and_status(outcome: Outcome) -> (String, String) {
    let Outcome::Outputs(outputs) = outcome else {
        panic!("expected outputs, got {outcome:?}");
    };
    let [output] = &outputs[..] else {
        panic!("expected one output, got {outputs:?}");
    };
    let status = output
        .headers
        .iter()
        .find(|(name, _)| name == "status")
        .map(|(_, value)| value.clone())
        .unwrap_or_default();
    (
        String::from_utf8_lossy(&output.payload).into_owned(),
        status,
    )
}

fn rejected(outcome: Outcome) -> String {
    match outcome {
        Outcome::Reject(reason) => reason,
        other => panic!("expected a reject, got {other:?}"),
    }
}

#[tokio::test]
async fn a_granted_origin_answers() {
    let server = Server::start().await;
    let plugin = load(granted(&["http://127.0.0.1:*".into()], &[]));
    let outcome = fetch(&plugin, &server.url("/hello")).await.unwrap();
    assert_eq!(
        body_and_status(outcome),
        ("hello from the server".into(), "200".into())
    );
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn without_a_grant_no_request_leaves() {
    let server = Server::start().await;
    let plugin = load(settings("fetch", &[]));
    let reason = rejected(fetch(&plugin, &server.url("/hello")).await.unwrap());
    assert!(reason.contains("HttpRequestDenied"), "{reason}");
    assert_eq!(server.requests(), 0);
}

#[tokio::test]
async fn an_origin_outside_the_grant_is_denied() {
    let allowed = Server::start().await;
    let denied = Server::start().await;
    // The same host on another port is another origin.
    let plugin = load(granted(&[allowed.origin()], &[]));
    let reason = rejected(fetch(&plugin, &denied.url("/hello")).await.unwrap());
    assert!(reason.contains("HttpRequestDenied"), "{reason}");
    assert_eq!(denied.requests(), 0);
    // The granted one still answers from the same plugin.
    let outcome = fetch(&plugin, &allowed.url("/hello")).await.unwrap();
    assert_eq!(body_and_status(outcome).1, "200");
}

#[tokio::test]
async fn a_redirect_to_a_denied_origin_is_not_followed_there() {
    let allowed = Server::start().await;
    let denied = Server::start().await;
    let to_denied = allowed.url(&format!("/redirect?to={}", denied.url("/hello")));
    let to_allowed = allowed.url(&format!("/redirect?to={}", allowed.url("/hello")));

    // The host hands a redirect to the plugin as it came.
    let plugin = load(granted(&[allowed.origin()], &[]));
    let outcome = fetch(&plugin, &to_denied).await.unwrap();
    assert_eq!(body_and_status(outcome).1, "302");

    // A plugin that follows it makes a new request, checked like any other.
    let plugin = load(granted(
        &[allowed.origin()],
        &[("follow_redirects", "true")],
    ));
    let reason = rejected(fetch(&plugin, &to_denied).await.unwrap());
    assert!(reason.contains("HttpRequestDenied"), "{reason}");
    let outcome = fetch(&plugin, &to_allowed).await.unwrap();
    assert_eq!(
        body_and_status(outcome),
        ("hello from the server".into(), "200".into())
    );
    assert_eq!(denied.requests(), 0);
}

#[tokio::test]
async fn a_server_slower_than_the_deadline_times_the_call_out() {
    let server = Server::start().await;
    let plugin = load(granted(&[server.origin()], &[]));
    let error = fetch(&plugin, &server.url("/slow")).await.unwrap_err();
    assert!(matches!(error, CallError::Timeout(_)), "{error:?}");
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn requests_in_flight_stay_within_the_plugins_bound() {
    let server = Server::start().await;
    let mut settings = granted(&[server.origin()], &[]);
    settings.timeout = Duration::from_secs(10);
    settings.outbound_http = Arc::new(OutboundHttp::new(vec![server.origin().parse().unwrap()], 2));
    let plugin = load(settings);
    // Six instances call at once; their requests share the plugin's bound.
    let calls = (0..6).map(|_| {
        let plugin = plugin.clone();
        let url = server.url("/busy");
        tokio::spawn(async move { fetch(&plugin, &url).await })
    });
    for call in futures::future::join_all(calls).await {
        assert_eq!(body_and_status(call.unwrap().unwrap()).0, "done");
    }
    assert_eq!(server.requests(), 6);
    assert_eq!(server.counts.most_in_flight.load(Ordering::SeqCst), 2);
}

/// The example plugin `fetch` in `lang`, granted `origins`.
#[cfg(feature = "languages")]
fn load_example(lang: &str, origins: &[String]) -> Arc<Plugin> {
    let mut settings = granted(origins, &[]);
    settings.timeout = Duration::from_secs(5);
    Arc::new(
        runtime()
            .load_file(&common::example_path(lang, "fetch"), settings)
            .unwrap(),
    )
}

/// What a `fetch` example in `lang` must do: reach a granted origin, be
/// denied (with a reason containing `denied`) another origin and any when
/// granted none, and hand a redirect back as it came, following nothing.
#[cfg(feature = "languages")]
async fn a_granted_origin_only(lang: &str, denied_reason: &str) {
    let allowed = Server::start().await;
    let denied = Server::start().await;
    let plugin = load_example(lang, &[allowed.origin()]);

    let outcome = fetch(&plugin, &allowed.url("/hello")).await.unwrap();
    assert_eq!(
        body_and_status(outcome),
        ("hello from the server".into(), "200".into())
    );
    let reason = rejected(fetch(&plugin, &denied.url("/hello")).await.unwrap());
    assert!(reason.contains(denied_reason), "{reason}");
    let to_denied = allowed.url(&format!("/redirect?to={}", denied.url("/hello")));
    let outcome = fetch(&plugin, &to_denied).await.unwrap();
    assert_eq!(body_and_status(outcome).1, "302");
    assert_eq!(denied.requests(), 0);

    let ungranted = load_example(lang, &[]);
    let reason = rejected(fetch(&ungranted, &allowed.url("/hello")).await.unwrap());
    assert!(
        reason.starts_with("GET ") && reason.contains(denied_reason),
        "{reason}"
    );
    assert_eq!(allowed.requests(), 2, "the hello and the redirect");
}

/// JavaScript's `fetch` goes through the same grant (a denial is its
/// `TypeError`).
#[cfg(feature = "languages")]
#[tokio::test]
async fn javascript_fetch_reaches_a_granted_origin_only() {
    a_granted_origin_only("js", "TypeError").await;
}

/// Python's `sluice.http_get` goes through the same grant.
#[cfg(feature = "languages")]
mod python {
    use super::*;

    #[tokio::test]
    async fn http_get_reaches_a_granted_origin_only() {
        a_granted_origin_only("python", "HttpRequestDenied").await;
    }

    #[tokio::test]
    async fn a_granted_request_without_a_response_names_why() {
        // A port that was just free: nothing listens there.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let plugin = load_example("python", &["http://127.0.0.1:*".into()]);
        let url = format!("http://{closed}/hello");
        let reason = rejected(fetch(&plugin, &url).await.unwrap());
        assert!(reason.contains("ConnectionRefused"), "{reason}");
    }
}
