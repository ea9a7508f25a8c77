//! The web console in a real browser: a headless Chromium, driven over
//! WebDriver, against a running `sluice run` with a token.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
//! them). Screenshots of each stage go to `target/tmp/console/`.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{KillOnDrop, free_port, http_get as get, plugin_path};
use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use sluice_tests::common;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TOKEN: &str = "console-test-token";
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;
/// Messages the route handles before the browser looks.
const HANDLED: u64 = 7;

/// Waits until `check` returns something, or fails with `what`.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < give_up, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `sluice run` on SQLite with one route, `upper`, and the admin
/// API with a token on `port`.
fn start_host(dir: &Path, port: u16) -> KillOnDrop {
    let url = format!("sqlite://{}", dir.join("sluice.db").display());
    common::run_admin_host(dir, &url, port, &format!("token = \"{TOKEN}\""), "")
}

fn publish(dir: &Path, count: u64) {
    let url = format!("sqlite://{}", dir.join("sluice.db").display());
    let status = common::sluice()
        .args(["publish", "--url", &url, "words", "hello console"])
        .args(["--count", &count.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The route `upper` as the API reports it.
fn api_route(admin: &str) -> Value {
    let (status, body) = get(&format!("{admin}/api/routes"), Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let routes: Value = serde_json::from_str(&body).unwrap();
    routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "upper")
        .cloned()
        .expect("route upper listed")
}

fn start_chromedriver() -> (KillOnDrop, String) {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install chromium chromium-driver"
        );
    }
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let give_up = Instant::now() + Duration::from_secs(30);
    while get(&format!("{url}/status"), None).0 != 200 {
        assert!(Instant::now() < give_up, "chromedriver never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    (KillOnDrop(child), url)
}

async fn browser(driver: &str) -> Client {
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--force-device-scale-factor=1",
                format!("--window-size={WIDTH},{HEIGHT}"),
            ],
        }
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(driver)
        .await
        .expect("a chromium session from chromedriver")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_routes_behind_the_token_and_pauses_them() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let _host = start_host(dir.path(), port);
    let give_up = Instant::now() + Duration::from_secs(60);
    while get(&format!("{admin}/healthz"), None).0 != 200 {
        assert!(Instant::now() < give_up, "the admin API never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    publish(dir.path(), HANDLED);
    eventually("the route to handle the messages", async || {
        (api_route(&admin)["stats"]["succeeded"] == HANDLED).then_some(())
    })
    .await;

    let shots = common::target_tmp().join("console");
    std::fs::create_dir_all(&shots).unwrap();
    for old in std::fs::read_dir(&shots).unwrap() {
        std::fs::remove_file(old.unwrap().path()).unwrap();
    }

    let (_driver, driver_url) = start_chromedriver();
    let client = browser(&driver_url).await;
    // End the browser session whatever happens, so no Chromium outlives
    // the test; then report what happened.
    let outcome = AssertUnwindSafe(drive(&client, &admin, dir.path(), &shots))
        .catch_unwind()
        .await;
    let _ = client.close().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn drive(client: &Client, admin: &str, dir: &Path, shots: &Path) {
    fit_viewport(client).await;

    // Without the token: the prompt, and nothing of the routes.
    let (status, _) = get(&format!("{admin}/api/routes"), None);
    assert_eq!(status, 401, "the API answered without the token");
    client.goto(&format!("{admin}/")).await.unwrap();
    eventually("the token prompt", async || {
        visible(client, "#login").await.then_some(())
    })
    .await;
    assert!(
        !visible(client, "#data").await,
        "data shown without a token"
    );
    assert!(
        client
            .find_all(Locator::Css("#routes tbody tr"))
            .await
            .unwrap()
            .is_empty(),
        "route rows rendered without a token"
    );
    let text = page_text(client).await;
    assert!(
        !text.contains("upper") && !text.contains("words"),
        "route data on the page without a token:\n{text}"
    );
    screenshot(client, shots, "1-token-prompt").await;

    // With the token: the route and its counts, as the API has them.
    client
        .find(Locator::Css("#token-input"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    client
        .find(Locator::Css("#token-form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let row = "#routes tr[data-route=\"upper\"]";
    eventually("the route's row", async || {
        client.find(Locator::Css(row)).await.ok()
    })
    .await;
    assert!(!visible(client, "#login").await, "the prompt stayed up");
    let received = cell(client, row, "received").await;
    let acked = cell(client, row, "acked").await;
    let stats = api_route(admin)["stats"].clone();
    assert_eq!(acked, stats["succeeded"].to_string());
    assert_eq!(acked, HANDLED.to_string());
    assert_eq!(received, stats["received"].to_string());
    assert_eq!(cell(client, row, "state").await, "running");
    // The rate needs two polls; it is a number (0.0 on an idle route).
    let rate = eventually("a rate", async || {
        let rate = cell(client, row, "rate").await;
        rate.parse::<f64>().ok()
    })
    .await;
    assert!(rate >= 0.0);
    screenshot(client, shots, "2-routes").await;

    // Pause, then resume, from the route's buttons.
    click(client, "button[data-action=pause][data-route=upper]").await;
    eventually("the API to say paused", async || {
        (api_route(admin)["paused"] == true).then_some(())
    })
    .await;
    eventually("the page to say paused", async || {
        (cell(client, row, "state").await == "paused").then_some(())
    })
    .await;
    assert!(visible(client, "button[data-action=resume][data-route=upper]").await);
    assert!(!visible(client, "button[data-action=pause][data-route=upper]").await);
    screenshot(client, shots, "3-paused").await;

    click(client, "button[data-action=resume][data-route=upper]").await;
    eventually("the API to say running", async || {
        (api_route(admin)["paused"] == false).then_some(())
    })
    .await;
    eventually("the page to say running", async || {
        (cell(client, row, "state").await == "running").then_some(())
    })
    .await;
    screenshot(client, shots, "4-resumed").await;

    // Messages flowing show in the counts and draw the chart: a line above
    // its baseline.
    publish(dir, HANDLED);
    let total = (2 * HANDLED).to_string();
    eventually("the page to count the new messages", async || {
        (cell(client, row, "acked").await == total).then_some(())
    })
    .await;
    assert_eq!(api_route(admin)["stats"]["succeeded"].to_string(), total);
    eventually("the chart to show the throughput", async || {
        let drawn = client
            .execute(CHART_ABOVE_BASELINE, vec![json!(row)])
            .await
            .unwrap();
        (drawn == true).then_some(())
    })
    .await;
    screenshot(client, shots, "4-throughput").await;

    // Deploy another version from the plugin's file picker, then roll back
    // from its button, through the confirmation.
    let first = plugin_version(admin);
    let echo = plugin_path("echo");
    let second = sluice::runtime::hash(&std::fs::read(&echo).unwrap());
    assert_ne!(first, second);
    client
        .find(Locator::Css(
            "input[type=file][data-action=deploy-file][data-plugin=upper]",
        ))
        .await
        .unwrap()
        .send_keys(echo.to_str().unwrap())
        .await
        .unwrap();
    let version = "#plugins tr[data-plugin=\"upper\"]";
    for (what, expected) in [("deployed", &second), ("rolled back", &first)] {
        if what == "rolled back" {
            click(client, "button[data-action=rollback][data-plugin=upper]").await;
            eventually("the confirmation", async || {
                client.accept_alert().await.ok()
            })
            .await;
        }
        eventually(&format!("the API to run the {what} version"), async || {
            (plugin_version(admin) == *expected).then_some(())
        })
        .await;
        eventually(
            &format!("the page to show the {what} version"),
            async || (cell(client, version, "version").await == expected[..12]).then_some(()),
        )
        .await;
        screenshot(client, shots, &format!("5-{}", what.replace(' ', "-"))).await;
    }

    // A shadow run started from the plugin's other file picker, then
    // stopped from its button.
    let shadow = format!("{admin}/api/plugins/upper/shadow");
    client
        .find(Locator::Css(
            "input[type=file][data-action=shadow-file][data-plugin=upper]",
        ))
        .await
        .unwrap()
        .send_keys(echo.to_str().unwrap())
        .await
        .unwrap();
    eventually("the API to report the shadow run", async || {
        let (status, body) = get(&shadow, Some(TOKEN));
        (status == 200
            && serde_json::from_str::<Value>(&body).unwrap()["candidate"]["hash"]
                == second.as_str())
        .then_some(())
    })
    .await;
    eventually("the page to show the shadow run", async || {
        cell(client, version, "shadow")
            .await
            .starts_with(&second[..12])
            .then_some(())
    })
    .await;
    screenshot(client, shots, "6-shadow").await;
    click(client, "button[data-action=shadow-stop][data-plugin=upper]").await;
    eventually("the API to have stopped the shadow run", async || {
        (get(&shadow, Some(TOKEN)).0 == 404).then_some(())
    })
    .await;
    eventually("the page to show no shadow run", async || {
        (cell(client, version, "shadow").await == "-").then_some(())
    })
    .await;

    // A payload that is not UTF-8, which the plugin rejects: the dead-letter
    // browser lists it, and purges it through the confirmation.
    publish_lines(dir, r#"{"payload_base64":"//4="}"#);
    let letters = format!("{admin}/api/routes/upper/dead-letters");
    eventually("the API to list the dead letter", async || {
        let (_, body) = get(&letters, Some(TOKEN));
        (serde_json::from_str::<Value>(&body).unwrap()["count"] == 1).then_some(())
    })
    .await;
    let (_, body) = get(&format!("{letters}/messages"), Some(TOKEN));
    let id = serde_json::from_str::<Value>(&body).unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    click(client, "button[data-action=dead-letters][data-route=upper]").await;
    let listed = eventually("the page to list the dead letter", async || {
        let rows = client
            .find_all(Locator::Css("#dl-messages tbody tr"))
            .await
            .unwrap();
        match rows.as_slice() {
            [row] => Some(row.text().await.unwrap()),
            _ => None,
        }
    })
    .await;
    assert!(
        listed.contains(&id) && listed.contains("rejected"),
        "{listed}"
    );
    screenshot(client, shots, "7-dead-letters").await;
    click(client, "#dl-purge-all").await;
    eventually("the confirmation", async || {
        client.accept_alert().await.ok()
    })
    .await;
    eventually("the page to report the purge", async || {
        let status = client
            .find(Locator::Css("#status"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        status.ends_with("done (1 purged)").then_some(())
    })
    .await;
    eventually("the API to have purged it", async || {
        let (_, body) = get(&letters, Some(TOKEN));
        (serde_json::from_str::<Value>(&body).unwrap()["count"] == 0).then_some(())
    })
    .await;
    eventually("the page to list none", async || {
        let rows = client
            .find_all(Locator::Css("#dl-messages tbody tr"))
            .await
            .unwrap();
        rows.is_empty().then_some(())
    })
    .await;
    screenshot(client, shots, "8-purged").await;
}

/// Publishes to `words` the message `line`, as `sluice tail --json` prints
/// one.
fn publish_lines(dir: &Path, line: &str) {
    let url = format!("sqlite://{}", dir.join("sluice.db").display());
    common::publish_json_lines(&url, "words", line.as_bytes());
}

/// The hash of plugin `upper`'s live version, as the API reports it.
fn plugin_version(admin: &str) -> String {
    let (status, body) = get(&format!("{admin}/api/plugins"), Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let plugins: Value = serde_json::from_str(&body).unwrap();
    plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "upper")
        .expect("plugin upper listed")["current"]["hash"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Sizes the window so that the page, which is what a screenshot shows,
/// is WIDTH by HEIGHT: the window's own edges take a browser-dependent
/// share of its size, even headless.
async fn fit_viewport(client: &Client) {
    client.set_window_size(WIDTH, HEIGHT).await.unwrap();
    let (width, height) = viewport(client).await;
    client
        .set_window_size(2 * WIDTH - width, 2 * HEIGHT - height)
        .await
        .unwrap();
    assert_eq!(viewport(client).await, (WIDTH, HEIGHT));
}

async fn viewport(client: &Client) -> (u32, u32) {
    let size = client
        .execute("return [window.innerWidth, window.innerHeight]", vec![])
        .await
        .unwrap();
    let side = |i: usize| u32::try_from(size[i].as_u64().unwrap()).unwrap();
    (side(0), side(1))
}

/// Whether the chart of the route row `arguments[0]` has anything drawn
/// above its baseline (the bottom three rows of pixels).
const CHART_ABOVE_BASELINE: &str = "
    const canvas = document.querySelector(arguments[0] + ' canvas');
    const g = canvas.getContext('2d');
    const above = g.getImageData(0, 0, canvas.width, canvas.height - 3).data;
    for (let i = 3; i < above.length; i += 4) if (above[i] > 0) return true;
    return false;
";

/// Whether the element `css` is on the page and shown.
async fn visible(client: &Client, css: &str) -> bool {
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.is_displayed().await.unwrap(),
        Err(_) => false,
    }
}

async fn page_text(client: &Client) -> String {
    client
        .find(Locator::Css("body"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The text of the cell of class `class` in the row `row`.
async fn cell(client: &Client, row: &str, class: &str) -> String {
    client
        .find(Locator::Css(&format!("{row} td.{class}")))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Saves a screenshot as `name`.png and checks it is a picture of the
/// page: a PNG of the size the window was given that is not one flat
/// colour.
async fn screenshot(client: &Client, shots: &Path, name: &str) {
    let png = client.screenshot().await.unwrap();
    let path = shots.join(format!("{name}.png"));
    std::fs::write(&path, &png).unwrap();

    assert_eq!(
        &png[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: not a PNG",
        path.display()
    );
    assert_eq!(&png[12..16], b"IHDR", "{}: no IHDR first", path.display());
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!(
        (width, height),
        (WIDTH, HEIGHT),
        "{}: not the window's size",
        path.display()
    );

    let mut reader = png::Decoder::new(std::io::Cursor::new(&png))
        .read_info()
        .unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    let pixel_bytes = frame.line_size / frame.width as usize;
    let colours: std::collections::HashSet<&[u8]> =
        pixels[..frame.buffer_size()].chunks(pixel_bytes).collect();
    assert!(
        colours.len() > 16,
        "{}: {} colours: a blank page?",
        path.display(),
        colours.len()
    );
}
