//! The web UI: its port's defences over plain HTTP, and the chat window in headless Chromium
//! (Debian's `chromium` and `chromium-driver`, driven over W3C WebDriver) with a relay and real
//! nodes: a message shown live, the read tick, files by picker and by drag and drop with their
//! thumbnail, a group's per-member ticks, paging through 10,000 messages, and a reconnect after
//! a daemon restart; and a contact's safety number, marked verified, then warned about when the
//! contact's identity key changes. Screenshots of each step go to `target/ui-screenshots/`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kith_node::core::store::{Batch, Contact, Direction, Store, StoredMessage};
use kith_protocol::{MessageId, MessageState};
use kith_tests::webdriver::{screenshot_dir, Browser, Driver, ENTER};
use kith_tests::{init_logs, wait_for, TestNode};
use serde_json::{json, Value};

/// The page and what it loads at start may weigh this much at most.
const MAX_INITIAL_PAGE_BYTES: usize = 300 * 1024;

/// The tests of this file run one at a time: a browser and three nodes, or ten thousand stored
/// messages, take the two cores of a test machine, and a test's deadlines are meant to measure
/// its own nodes and page, not the load of the test beside it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn token(node: &TestNode) -> Result<String> {
    Ok(
        std::fs::read_to_string(node.home.join(kith_node::TOKEN_FILE))?
            .trim()
            .to_owned(),
    )
}

fn api(node: &TestNode) -> std::net::SocketAddr {
    node.running.as_ref().expect("running").api_addr
}

/// A one-time link to `node`'s chat window, as `kith ui` prints it.
async fn ui_link(node: &TestNode) -> Result<String> {
    let client = kith_node::api::client::Client::for_home(&node.home)?;
    let answer: Value = client.post("/v1/ui/code", &json!({})).await?;
    answer["url"]
        .as_str()
        .map(str::to_owned)
        .context("no url in the answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_refuses_strangers_wrong_hosts_and_cross_site_changes() -> Result<()> {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    init_logs();
    let alice = TestNode::start("alice", vec![]).await?;
    let addr = api(&alice);
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();

    // The page is public, with a strict policy and no inline script; it weighs little.
    let page = http.get(format!("{base}/")).send().await?;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()?
        .to_owned();
    assert!(
        csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let html = page.text().await?;
    assert!(!html.contains("<script>"), "no inline script");
    let mut bytes = html.len();
    for asset in ["app.js", "app.css", "icon.svg"] {
        let body = http.get(format!("{base}/assets/{asset}")).send().await?;
        assert_eq!(body.status(), 200, "{asset}");
        bytes += body.bytes().await?.len();
    }
    println!("initial page: {bytes} bytes (HTML + CSS + JS + icon)");
    assert!(bytes <= MAX_INITIAL_PAGE_BYTES, "{bytes} bytes");
    assert_eq!(bytes, kith_node::api::ui::initial_page_bytes());

    // No credentials: refused. A wrong Host (DNS rebinding): refused even with the token.
    let bare = http.get(format!("{base}/v1/contacts")).send().await?;
    assert_eq!(bare.status(), 401);
    let rebound = http
        .get(format!("{base}/v1/contacts"))
        .header("host", format!("rebind.example:{}", addr.port()))
        .bearer_auth(token(&alice)?)
        .send()
        .await?;
    assert_eq!(rebound.status(), 421);
    let rebound_page = http
        .get(format!("{base}/"))
        .header("host", "evil.example")
        .send()
        .await?;
    assert_eq!(rebound_page.status(), 421);
    let with_token = http
        .get(format!("{base}/v1/contacts"))
        .bearer_auth(token(&alice)?)
        .send()
        .await?;
    assert_eq!(with_token.status(), 200);

    // `kith ui` prints a link with a one-time code; the code buys one session cookie, once;
    // the exchange itself is same-origin only.
    let printed = kith_tests::process::kith(&alice.home, &["ui"])?;
    assert!(printed.status.success(), "{printed:?}");
    let link = String::from_utf8(printed.stdout)?.trim().to_owned();
    assert!(link.starts_with(&format!("{base}/#code=")), "{link}");
    let code = link
        .split("#code=")
        .nth(1)
        .context("code in link")?
        .to_owned();
    assert!(
        !link.contains(&token(&alice)?),
        "the token never goes in a URL"
    );
    let cross = http
        .post(format!("{base}/ui/session"))
        .json(&json!({ "code": code }))
        .send()
        .await?;
    assert_eq!(cross.status(), 403, "no x-kith-csrf header");
    let exchange = || {
        http.post(format!("{base}/ui/session"))
            .header("x-kith-csrf", "1")
            .header("origin", base.clone())
            .json(&json!({ "code": code }))
    };
    let session = exchange().send().await?;
    assert_eq!(session.status(), 200);
    let set_cookie = session.headers()["set-cookie"].to_str()?.to_owned();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
    let cookie = set_cookie.split(';').next().context("cookie")?.to_owned();
    assert_eq!(exchange().send().await?.status(), 401, "a code works once");

    let read = http
        .get(format!("{base}/v1/contacts"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(read.status(), 200);
    let change = |origin: Option<&str>, csrf: bool| {
        let mut request = http
            .post(format!("{base}/v1/contacts"))
            .header("cookie", &cookie)
            .json(&json!({ "name": "x", "peer": "not a peer" }));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if csrf {
            request = request.header("x-kith-csrf", "1");
        }
        request.send()
    };
    assert_eq!(
        change(None, false).await?.status(),
        403,
        "a cross-site form"
    );
    assert_eq!(
        change(Some("http://evil.example"), true).await?.status(),
        403
    );
    // Same origin: let through to the handler (which refuses the bad peer id itself).
    assert_eq!(change(Some(&base), true).await?.status(), 400);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_pages_uploads_and_files_over_http() -> Result<()> {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    init_logs();
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("alice");
    TestNode::init_home(&home, "alice")?;
    let mut settings = kith_node::Settings::load(&home)?;
    settings.max_file_bytes = 1024 * 1024;
    settings.save(&home)?;
    let alice = TestNode::start_in(kith_node::Config::loopback(&home)).await?;
    let bob = TestNode::start("bob", vec![]).await?;
    kith_tests::befriend(&alice, "bob", &bob).await?;
    kith_tests::befriend(&bob, "alice", &alice).await?;
    let http = reqwest::Client::new();
    let bob_get = |path: String| {
        let request = http
            .get(format!("http://{}{path}", api(&bob)))
            .bearer_auth(token(&bob).unwrap_or_default());
        async move { anyhow::Ok(request.send().await?.json::<Value>().await?) }
    };

    for i in 0..5 {
        alice.node().send("bob", &format!("m{i}"), None).await?;
    }
    wait_for("five messages at bob's", || async {
        (bob.node().messages(Some("alice")).ok()?.len() == 5).then_some(())
    })
    .await?;
    let list = bob_get("/v1/conversations".into()).await?;
    let entry = &list[0];
    assert_eq!(entry["name"], "alice");
    assert_eq!(entry["unread"], 5);
    assert_eq!(entry["last"]["text"], "m4");

    // Pages, oldest first within a page, each before the previous page's first message.
    let texts = |page: &Value| -> Vec<String> {
        page.as_array()
            .into_iter()
            .flatten()
            .map(|m| m["text"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let newest = bob_get("/v1/messages?with=alice&limit=2".into()).await?;
    assert_eq!(texts(&newest), ["m3", "m4"]);
    let older = bob_get(format!(
        "/v1/messages?with=alice&limit=2&before={}",
        newest[0]["id"].as_str().context("id")?
    ))
    .await?;
    assert_eq!(texts(&older), ["m1", "m2"]);
    let oldest = bob_get(format!(
        "/v1/messages?with=alice&limit=2&before={}",
        older[0]["id"].as_str().context("id")?
    ))
    .await?;
    assert_eq!(texts(&oldest), ["m0"]);
    bob.node().read("alice").await?;
    assert_eq!(bob_get("/v1/conversations".into()).await?[0]["unread"], 0);

    // An upload streams into alice's uploads and goes out as a file; bob's copy of an HTML file
    // is served as a sandboxed download, never as a page of the UI's origin.
    let page = b"<script>alert('hi')</script>".to_vec();
    let upload = |name: &str, body: Vec<u8>| {
        http.post(format!(
            "http://{}/v1/upload?to=bob&name={name}",
            api(&alice)
        ))
        .bearer_auth(token(&alice).unwrap_or_default())
        .body(body)
        .send()
    };
    let sent: Value = upload("page.html", page.clone()).await?.json().await?;
    let id = sent["id"].as_str().context("id")?.to_owned();
    let parsed: MessageId = id.parse()?;
    wait_for("the file at bob's", || async {
        bob.node().attachment(&parsed)?.path
    })
    .await?;
    let served = http
        .get(format!("http://{}/v1/files/{id}", api(&bob)))
        .bearer_auth(token(&bob)?)
        .send()
        .await?;
    assert_eq!(served.status(), 200);
    let header = |name: &str| {
        served.headers()[name]
            .to_str()
            .map(str::to_owned)
            .unwrap_or_default()
    };
    assert_eq!(header("content-type"), "application/octet-stream");
    assert!(header("content-disposition").starts_with("attachment"));
    assert!(header("content-security-policy").starts_with("sandbox"));
    assert_eq!(served.bytes().await?.to_vec(), page);

    // Over max_file_bytes: refused while it streams, and nothing is left behind.
    let too_big = upload("big.bin", vec![7u8; 1024 * 1024 + 1]).await?;
    assert_eq!(too_big.status(), 413);
    let kept = std::fs::read_dir(home.join(kith_node::api::ui::files::UPLOADS_DIR))?.count();
    assert_eq!(kept, 1, "only page.html's upload stays");
    Ok(())
}

/// Adds `other` to `node`'s contacts from its invite (relays included), with a direct address.
async fn add_from_invite(node: &TestNode, name: &str, other: &TestNode) -> Result<()> {
    let direct = other
        .node()
        .listen_addrs()
        .await
        .into_iter()
        .find(|a| !a.to_string().contains("p2p-circuit"))
        .context("a direct address")?;
    node.node()
        .add_contact(name, &other.node().invite().encode(), &[direct.to_string()])
        .await?;
    Ok(())
}

/// Writes a 480×320 PNG gradient.
fn write_png(path: &Path) -> Result<()> {
    image::RgbImage::from_fn(480, 320, |x, y| {
        image::Rgb([(x / 2) as u8, (y * 3 / 4) as u8, 160])
    })
    .save(path)?;
    Ok(())
}

/// Gives a fresh home 10,000 messages from `erin` (a contact), before its node starts.
async fn fill_history(home: &Path) -> Result<()> {
    let erin = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let store = Store::open(&home.join("db"))?;
    let mut batch = Batch::new();
    batch.put_contact(&Contact {
        name: "erin".into(),
        peer_id: erin,
        addrs: Vec::new(),
        relays: Vec::new(),
    });
    let now = kith_node::clock::now_ms();
    for i in 1..=10_000u64 {
        batch.put_message(&StoredMessage {
            id: MessageId::random(),
            direction: Direction::In,
            from: erin,
            peer: erin,
            text: format!("message {i} of 10000"),
            sent_at_ms: now - (10_000 - i) * 60_000,
            lamport: i,
            state: MessageState::Read,
            expires_at_ms: None,
        });
    }
    store.commit(batch).await?;
    let closed = store.closed();
    drop(store);
    closed.wait().await;
    Ok(())
}

struct Shots {
    dir: std::path::PathBuf,
    n: usize,
}

impl Shots {
    async fn take(&mut self, browser: &Browser, name: &str) -> Result<()> {
        self.n += 1;
        let path = self.dir.join(format!("{:02}-{name}.png", self.n));
        browser.screenshot(&path).await?;
        println!("screenshot: {}", path.display());
        Ok(())
    }
}

/// Opens `node`'s chat window in `browser` through a one-time link; returns when the
/// conversation list is on screen, with the time it took from navigation start (ms).
async fn sign_in(browser: &Browser, node: &TestNode) -> Result<f64> {
    browser.goto(&ui_link(node).await?).await?;
    let at = browser
        .wait(
            "the conversation list",
            "!document.getElementById('app').hidden && window.kith.timings.list",
        )
        .await?;
    let steps = browser.js("return window.kith.timings", json!([])).await?;
    println!("page timings (ms since navigation start): {steps}");
    at.as_f64().context("a time")
}

fn conv(id: &str) -> String {
    format!("#conversations li[data-conv=\"{id}\"]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_a_real_browser() -> Result<()> {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    init_logs();
    let Some(driver) = Driver::start().await? else {
        println!(
            "SKIPPED chat_in_a_real_browser: {} or {} is missing. Install them with \
             `apt-get install chromium chromium-driver` to run the browser tests.",
            kith_tests::webdriver::CHROMEDRIVER,
            kith_tests::webdriver::CHROMIUM
        );
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let (_relay, relay_addr) = kith_tests::start_group_relay(dir.path()).await?;
    let alice = TestNode::start("alice", vec![relay_addr.clone()]).await?;
    // bob downloads files up to 64 KiB by himself, larger ones when he asks.
    let bob_home = dir.path().join("bob");
    TestNode::init_home(&bob_home, "bob")?;
    let mut settings = kith_node::Settings::load(&bob_home)?;
    settings.auto_download_max_bytes = 64 * 1024;
    settings.save(&bob_home)?;
    let mut bob_config = kith_node::Config::loopback(&bob_home);
    bob_config.relays = vec![relay_addr.clone()];
    // The shortest timer bob may set, which his page offers first: long enough to see a
    // message arrive on a busy machine, short enough to see it go.
    bob_config.min_timer_secs = 5;
    let mut bob = TestNode::start_in(bob_config).await?;
    let carol = TestNode::start("carol", vec![relay_addr.clone()]).await?;
    for (node, others) in [
        (&alice, [("bob", &bob), ("carol", &carol)]),
        (&bob, [("alice", &alice), ("carol", &carol)]),
        (&carol, [("alice", &alice), ("bob", &bob)]),
    ] {
        for (name, other) in others {
            add_from_invite(node, name, other).await?;
        }
    }
    let (a_id, b_id, c_id) = (
        alice.peer_id().to_string(),
        bob.peer_id().to_string(),
        carol.peer_id().to_string(),
    );
    let mut shots = Shots {
        dir: screenshot_dir(),
        n: 0,
    };
    // Screenshots of an earlier run would mix with this one's (the numbered ones are this
    // test's; the others belong to tests running beside it).
    if let Ok(old) = std::fs::read_dir(&shots.dir) {
        for entry in old.flatten() {
            let name = entry.file_name();
            if name
                .to_string_lossy()
                .starts_with(|c: char| c.is_ascii_digit())
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let alice_page = driver.browser(&dir.path().join("alice-profile")).await?;
    let bob_page = driver.browser(&dir.path().join("bob-profile")).await?;
    let alice_list_ms = sign_in(&alice_page, &alice).await?;
    let bob_list_ms = sign_in(&bob_page, &bob).await?;
    println!(
        "conversation list on screen {alice_list_ms:.0} ms and {bob_list_ms:.0} ms after load"
    );
    // The goal is 200 ms on an idle machine (see the printed figures); the bound leaves room for a
    // busy CI machine running a debug build, and still fails a page that waits on something slow.
    assert!(alice_list_ms < 3000.0 && bob_list_ms < 3000.0);

    // 1. alice writes; bob's page shows it without a reload, as unread.
    alice_page.click(&conv(&b_id)).await?;
    alice_page
        .wait("alice's chat with bob", "window.kith.timings.opened >= 1")
        .await?;
    alice_page
        .type_into("#text", &format!("hello bob, this is alice{ENTER}"))
        .await?;
    alice_page
        .wait(
            "the sent message",
            "[...document.querySelectorAll('.msg.out .text')].some(e => e.textContent === 'hello bob, this is alice')",
        )
        .await?;
    bob_page
        .wait(
            "alice's message in bob's list",
            &format!(
                "document.querySelector('{} .badge')?.textContent === '1' && document.title === '(1) kith'",
                conv(&a_id).replace('\'', "\\'")
            ),
        )
        .await?;
    shots.take(&bob_page, "bob-sees-unread").await?;
    alice_page
        .wait(
            "the delivered tick",
            "['delivered', 'read'].includes(document.querySelector('.msg.out .tick')?.dataset.state)",
        )
        .await?;
    shots.take(&alice_page, "alice-delivered").await?;

    // 2. bob opens the chat: alice's tick turns to read.
    bob_page.click(&conv(&a_id)).await?;
    bob_page
        .wait(
            "the message in bob's chat",
            "[...document.querySelectorAll('.msg.in .text')].some(e => e.textContent === 'hello bob, this is alice') && document.title === 'kith'",
        )
        .await?;
    alice_page
        .wait(
            "the read tick",
            "document.querySelector('.msg.out .tick')?.dataset.state === 'read'",
        )
        .await?;
    shots.take(&alice_page, "alice-read").await?;

    // A send the daemon refuses (too long) is marked on the message, with a retry.
    alice_page
        .js(
            "const text = document.getElementById('text');
             text.value = 'x'.repeat(arguments[0]);
             document.getElementById('composer').requestSubmit();",
            json!([kith_protocol::limits::MAX_TEXT_BYTES + 1]),
        )
        .await?;
    alice_page
        .wait(
            "the failed send, marked",
            "[...document.querySelectorAll('.msg.out.has-error .error')].some(e => e.textContent.startsWith('Not sent:') && e.querySelector('button')?.textContent === 'Retry')",
        )
        .await?;
    shots.take(&alice_page, "alice-failed-send").await?;

    // bob types; alice sees it live.
    bob_page.type_into("#text", "ok").await?;
    alice_page
        .wait(
            "bob is typing",
            "document.getElementById('chat-sub').textContent.includes('typing')",
        )
        .await?;

    // 3. a picture by the file picker, a text file by drag and drop.
    let picture = dir.path().join("sunset.png");
    write_png(&picture)?;
    alice_page
        .type_into("#file", &picture.to_string_lossy())
        .await?;
    alice_page
        .wait(
            "alice's thumbnail",
            "document.querySelector('.msg.out img.thumb')?.naturalWidth > 0",
        )
        .await?;
    bob_page
        .wait(
            "the picture at bob's, with its thumbnail, downloaded",
            "document.querySelector('.msg.in img.thumb')?.naturalWidth > 0 && document.querySelector('.msg.in .file a.file-name')",
        )
        .await?;
    // The full picture is served back through the session: a real PNG of the right size.
    let full: Value = bob_page
        .js_async(
            "const done = arguments[arguments.length - 1];
             const a = document.querySelector('.msg.in .file a.file-name');
             fetch(a.href).then(r => r.blob()).then(b => done([b.size, b.type])).catch(e => done(String(e)));",
            json!([]),
        )
        .await?;
    assert_eq!(
        full[0].as_u64(),
        Some(std::fs::metadata(&picture)?.len()),
        "{full}"
    );
    shots.take(&bob_page, "bob-gets-picture").await?;
    // A list refresh replaces the conversation objects (it follows every message event); a
    // page of messages that comes back after one is still for the open conversation and is
    // shown, not dropped (a message once stayed off the page this way).
    let kept: Value = bob_page
        .js_async(
            "const done = arguments[arguments.length - 1];
             const k = window.kith.state;
             const newest = k.messages[k.messages.length - 1].id;
             k.messages.pop();
             const fetching = refreshNewest();
             k.open = Object.assign({}, k.open);
             fetching.then(() => done(k.messages.some(m => m.id === newest)), e => done(String(e)));",
            json!([]),
        )
        .await?;
    assert_eq!(kept, json!(true), "the page dropped a page of messages");
    bob_page
        .type_into("#text", &format!(", lovely picture!{ENTER}"))
        .await?;
    alice_page
        .wait(
            "bob's answer at alice's",
            "[...document.querySelectorAll('.msg.in .text')].some(e => e.textContent === 'ok, lovely picture!')",
        )
        .await?;
    alice_page
        .js(
            "const file = new File(['notes for bob\\n'], 'notes.txt', { type: 'text/plain' });
             const data = new DataTransfer();
             data.items.add(file);
             const chat = document.getElementById('chat');
             chat.dispatchEvent(new DragEvent('dragenter', { dataTransfer: data, bubbles: true }));
             chat.dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));",
            json!([]),
        )
        .await?;
    bob_page
        .wait(
            "the dropped file at bob's",
            "[...document.querySelectorAll('.msg.in .file-name')].some(e => e.textContent.startsWith('notes.txt'))",
        )
        .await?;
    let notes = bob
        .node()
        .messages(Some("alice"))?
        .into_iter()
        .find_map(|m| m.attachment.filter(|a| a.name == "notes.txt"))
        .context("notes.txt in bob's history")?;
    assert_eq!(notes.size, 14);
    // A larger file waits for bob's click, then downloads.
    let archive = dir.path().join("archive.bin");
    std::fs::write(
        &archive,
        (0..300_000u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )?;
    alice_page
        .type_into("#file", &archive.to_string_lossy())
        .await?;
    bob_page.click(".msg.in[aria-label] .file button").await?;
    let fetched = bob_page
        .wait(
            "the archive downloaded at bob's",
            "[...document.querySelectorAll('.msg.in a.file-name')].find(a => a.textContent.startsWith('archive.bin'))?.href",
        )
        .await?;
    let got: Value = bob_page
        .js_async(
            "const done = arguments[arguments.length - 1];
             fetch(arguments[0]).then(r => r.blob()).then(b => done(b.size)).catch(e => done(String(e)));",
            json!([fetched]),
        )
        .await?;
    assert_eq!(got, json!(300_000));

    // 3b. bob makes the chat temporary from alice's details: both pages show the change, and
    // alice's next message disappears from both once its 5 s are up.
    bob_page.click("#btn-info").await?;
    bob_page
        .wait(
            "the timer choice in alice's details, off",
            "document.getElementById('timer')?.value === 'off' && document.getElementById('timer').options[1]?.value === '5s'",
        )
        .await?;
    bob_page
        .js(
            "const pick = document.getElementById('timer');
             pick.value = '5s';
             pick.dispatchEvent(new Event('change'));",
            json!([]),
        )
        .await?;
    bob_page
        .wait(
            "the timer line and badge at bob's",
            "document.querySelector('.saved')?.textContent === 'Saved.' && [...document.querySelectorAll('.timer-line')].some(e => e.textContent.includes('You set disappearing messages to 5 seconds')) && document.querySelector('#chat-title .timer-badge')",
        )
        .await?;
    alice_page
        .wait(
            "bob's timer change at alice's",
            "[...document.querySelectorAll('.timer-line')].some(e => e.textContent.includes('bob set disappearing messages to 5 seconds')) && document.querySelector('#chat-title .timer-badge')?.textContent.includes('5 seconds')",
        )
        .await?;
    alice_page
        .type_into("#text", &format!("this one disappears{ENTER}"))
        .await?;
    bob_page
        .wait(
            "the temporary message at bob's, marked",
            "[...document.querySelectorAll('.msg.in')].some(e => e.querySelector('.text')?.textContent === 'this one disappears' && e.querySelector('.expires'))",
        )
        .await?;
    shots.take(&bob_page, "bob-temporary-chat").await?;
    for page in [&alice_page, &bob_page] {
        page.wait(
            "the temporary message gone",
            "![...document.querySelectorAll('.msg .text')].some(e => e.textContent === 'this one disappears')",
        )
        .await?;
    }
    for node in [&alice, &bob] {
        assert!(
            !node
                .node()
                .messages(None)?
                .iter()
                .any(|m| m.text == "this one disappears"),
            "an expired message stays in a node's history"
        );
    }
    bob_page
        .js(
            "const pick = document.getElementById('timer');
             pick.value = 'off';
             pick.dispatchEvent(new Event('change'));",
            json!([]),
        )
        .await?;
    alice_page
        .wait(
            "the timer off at alice's",
            "[...document.querySelectorAll('.timer-line')].some(e => e.textContent.includes('bob turned disappearing messages off')) && !document.querySelector('#chat-title .timer-badge')",
        )
        .await?;
    bob_page.click("#panel-close").await?;

    // 4. a group of three made in alice's page; per-member ticks in the message info.
    alice_page.click("#btn-group").await?;
    alice_page.type_into("input[name=gname]", "friends").await?;
    alice_page
        .click(&format!("#panel input[value=\"{b_id}\"]"))
        .await?;
    alice_page
        .click(&format!("#panel input[value=\"{c_id}\"]"))
        .await?;
    alice_page.click("#panel button[type=submit]").await?;
    let group = alice_page
        .wait(
            "the new group open",
            "window.kith.state.open?.kind === 'group' && window.kith.state.open.id",
        )
        .await?
        .as_str()
        .context("group id")?
        .to_owned();
    for node in [&bob, &carol] {
        wait_for("the member knows the group", || async {
            node.node()
                .group_list()
                .iter()
                .any(|g| g.group_id == group)
                .then_some(())
        })
        .await?;
    }
    alice_page
        .type_into("#text", &format!("hello friends{ENTER}"))
        .await?;
    let message = alice_page
        .wait(
            "the group message's id",
            "window.kith.state.messages.find(m => m.text === 'hello friends' && !m.local)?.id",
        )
        .await?
        .as_str()
        .context("id")?
        .to_owned();
    wait_for("carol has the group message", || async {
        carol
            .node()
            .messages(Some(&group))
            .ok()?
            .iter()
            .any(|m| m.text == "hello friends")
            .then_some(())
    })
    .await?;
    carol.node().read(&group).await?;
    wait_for("carol read, bob delivered", || async {
        let members = alice.node().status(&message).ok()?.members;
        (members.get(&c_id) == Some(&MessageState::Read)
            && members.get(&b_id) == Some(&MessageState::Delivered))
        .then_some(())
    })
    .await?;
    bob_page
        .wait(
            "the group in bob's list",
            &format!("document.querySelector('{}')", conv(&group)),
        )
        .await?;
    alice_page
        .click(&format!(".msg[data-id=\"{message}\"] .meta button"))
        .await?;
    alice_page
        .wait(
            "per-member ticks",
            &format!(
                "document.querySelector('#panel li[data-member=\"{c_id}\"] .tick')?.dataset.state === 'read' && document.querySelector('#panel li[data-member=\"{b_id}\"] .tick')?.dataset.state === 'delivered'"
            ),
        )
        .await?;
    shots.take(&alice_page, "alice-group-ticks").await?;
    // The group's details: alice (an admin) makes bob an admin too.
    alice_page.click("#btn-info").await?;
    alice_page
        .click(&format!("#panel .members li:nth-child({}) button", {
            let members = alice.node().group_list();
            let g = members
                .iter()
                .find(|g| g.group_id == group)
                .context("group")?;
            1 + g
                .members
                .iter()
                .position(|m| *m == b_id)
                .context("bob is a member")?
        }))
        .await?;
    wait_for("bob promoted", || async {
        alice
            .node()
            .group_list()
            .iter()
            .any(|g| g.group_id == group && g.admins.contains(&b_id))
            .then_some(())
    })
    .await?;
    alice_page
        .wait(
            "two admins shown",
            "document.querySelectorAll('#panel .members .badge.admin').length === 2",
        )
        .await?;
    shots.take(&alice_page, "alice-group-members").await?;
    // The panel shows the key epoch; refreshing alice's keys moves it on.
    let epoch = alice.node().group_info(&group).await?.epoch;
    alice_page
        .wait(
            "the key epoch shown",
            &format!("document.querySelector('#panel .epoch')?.textContent.endsWith('key epoch {epoch}')"),
        )
        .await?;
    alice_page.click("#panel button.rekey").await?;
    alice_page
        .wait(
            "the next key epoch shown",
            &format!(
                "document.querySelector('#panel .epoch')?.textContent.endsWith('key epoch {}')",
                epoch + 1
            ),
        )
        .await?;

    // alice's chat with bob, as README shows it.
    alice_page.click(&conv(&b_id)).await?;
    alice_page
        .wait(
            "alice's chat with bob again",
            "window.kith.state.open?.name === 'bob' && document.querySelectorAll('.msg').length >= 4 && document.querySelector('.msg.out img.thumb')?.naturalWidth > 0",
        )
        .await?;
    shots.take(&alice_page, "alice-chat").await?;
    // The system's dark theme.
    let light = alice_page
        .js(
            "return getComputedStyle(document.body).backgroundColor",
            json!([]),
        )
        .await?;
    alice_page.color_scheme("dark").await?;
    let dark = alice_page
        .js(
            "return getComputedStyle(document.body).backgroundColor",
            json!([]),
        )
        .await?;
    assert_ne!(light, dark, "the dark theme changes the background");
    shots.take(&alice_page, "alice-chat-dark").await?;
    alice_page.color_scheme("light").await?;

    // 5. without the session cookie the API refuses the page's own requests.
    let refused = alice_page
        .js_async(
            "const done = arguments[arguments.length - 1];
             fetch('/v1/contacts', { credentials: 'omit' }).then(r => done(r.status)).catch(e => done(String(e)));",
            json!([]),
        )
        .await?;
    assert_eq!(refused, json!(401));

    // 6. a conversation of 10,000 messages opens with one page and loads more on scroll.
    let dave_dir = tempfile::tempdir()?;
    TestNode::init_home(dave_dir.path(), "dave")?;
    fill_history(dave_dir.path()).await?;
    let dave = TestNode::start_in(kith_node::Config::loopback(dave_dir.path())).await?;
    let dave_page = driver.browser(&dir.path().join("dave-profile")).await?;
    sign_in(&dave_page, &dave).await?;
    let erin = dave_page
        .wait(
            "erin in the list",
            "window.kith.state.convs.find(c => c.name === 'erin')?.id",
        )
        .await?
        .as_str()
        .context("erin")?
        .to_owned();
    dave_page.click(&conv(&erin)).await?;
    let open_ms = dave_page
        .wait(
            "the long conversation",
            "window.kith.timings.opened >= 1 && window.kith.timings.open",
        )
        .await?
        .as_f64()
        .context("ms")?;
    let shown = dave_page
        .js(
            "return document.querySelectorAll('#messages .msg').length",
            json!([]),
        )
        .await?;
    println!("10,000-message conversation: {shown} messages rendered in {open_ms:.0} ms");
    assert_eq!(shown, json!(50));
    assert!(open_ms < 2000.0, "{open_ms} ms");
    dave_page
        .js(
            "document.getElementById('messages').scrollTop = 0",
            json!([]),
        )
        .await?;
    dave_page
        .wait(
            "an older page",
            "document.querySelectorAll('#messages .msg').length === 100 && document.querySelector('#messages .msg .text').textContent === 'message 9901 of 10000'",
        )
        .await?;
    shots.take(&dave_page, "long-conversation").await?;
    // dave adds alice from her invite, and shows his own invite with its QR code.
    dave_page.click("#btn-add").await?;
    dave_page
        .type_into("#panel input[name=name]", "alice")
        .await?;
    dave_page
        .type_into(
            "#panel textarea[name=peer]",
            &alice.node().invite().encode(),
        )
        .await?;
    dave_page.click("#panel button[type=submit]").await?;
    dave_page
        .wait(
            "alice in dave's list, open",
            &format!("window.kith.state.open?.id === '{a_id}'"),
        )
        .await?;
    // alice never added dave: his message waits in her page's requests, until she accepts
    // it under a name of her choosing; then it is a conversation like any other.
    let d_id = dave.peer_id().to_string();
    dave_page
        .type_into("#text", &format!("hello alice, this is dave{ENTER}"))
        .await?;
    alice_page
        .wait(
            "dave's message request at alice's",
            &format!(
                "document.querySelector('#requests .request[data-peer=\"{d_id}\"] .preview')?.textContent.includes('hello alice, this is dave') && !document.querySelector('{}')",
                conv(&d_id).replace('\'', "\\'")
            ),
        )
        .await?;
    shots.take(&alice_page, "alice-message-request").await?;
    alice_page
        .type_into(
            &format!("#requests .request[data-peer=\"{d_id}\"] .request-name"),
            "dave",
        )
        .await?;
    alice_page
        .click(&format!("#requests .request[data-peer=\"{d_id}\"] .accept"))
        .await?;
    alice_page
        .wait(
            "dave's chat open at alice's, with his message",
            &format!("window.kith.state.open?.id === '{d_id}' && window.kith.state.open.name === 'dave' && document.getElementById('requests').hidden && [...document.querySelectorAll('.msg.in .text')].some(e => e.textContent === 'hello alice, this is dave')"),
        )
        .await?;
    assert!(alice
        .node()
        .contacts()?
        .iter()
        .any(|c| c.name == "dave" && c.peer_id == d_id));
    // The keyboard: from alice (first in the list: dave just wrote to her), ArrowDown then
    // Enter opens erin's chat.
    let order = dave_page
        .js(
            "return [...document.querySelectorAll('#conversations li')].map(li => li.dataset.conv)",
            json!([]),
        )
        .await?;
    assert_eq!(order, json!([a_id, erin]));
    dave_page
        .type_into("#conversations li:nth-child(1)", "\u{E015}")
        .await?;
    dave_page
        .wait(
            "the focus on erin",
            &format!("document.activeElement.dataset.conv === '{erin}'"),
        )
        .await?;
    dave_page
        .type_into("#conversations li:nth-child(2)", &ENTER.to_string())
        .await?;
    dave_page
        .wait(
            "erin's chat open",
            "window.kith.state.open?.name === 'erin'",
        )
        .await?;
    dave_page.click("#btn-invite").await?;
    dave_page
        .wait(
            "the invite's QR code",
            "document.querySelector('#panel img.qr')?.naturalWidth > 0 && document.querySelector('#panel textarea').value.startsWith('kith:')",
        )
        .await?;
    shots.take(&dave_page, "dave-invite").await?;
    // dave turns read receipts off in the settings: in effect at once, and saved.
    dave_page.click("#btn-settings").await?;
    dave_page.click("#panel input[name=receipts]").await?;
    dave_page.click("#panel button[type=submit]").await?;
    dave_page
        .wait(
            "the saved note",
            "document.querySelector('#panel .note')?.textContent === 'Saved.'",
        )
        .await?;
    assert!(!dave.node().settings_view().read_receipts);
    assert!(!kith_node::Settings::load(dave_dir.path())?.read_receipts);
    dave_page.quit().await?;

    // A stranger's group waits in alice's page as an invitation until she joins it.
    let frank = TestNode::start("frank", vec![relay_addr.clone()]).await?;
    let club = frank
        .node()
        .create_group("frank's club", std::slice::from_ref(&a_id))
        .await?
        .group_id;
    alice_page
        .wait(
            "frank's invitation at alice's",
            &format!(
                "!!document.querySelector('#requests .invitation[data-group=\"{club}\"]') && !document.querySelector('{}')",
                conv(&club).replace('\'', "\\'")
            ),
        )
        .await?;
    shots.take(&alice_page, "alice-group-invitation").await?;
    alice_page
        .click(&format!(
            "#requests .invitation[data-group=\"{club}\"] .accept"
        ))
        .await?;
    alice_page
        .wait(
            "frank's group open at alice's",
            &format!("window.kith.state.open?.id === '{club}' && document.getElementById('requests').hidden"),
        )
        .await?;
    assert!(alice.node().group_invitations()?.is_empty());

    // 7. bob's daemon restarts on the same port; his page reconnects by itself.
    let bob_api = api(&bob);
    bob.stop().await;
    bob_page
        .wait(
            "the lost-connection banner",
            "!document.getElementById('banner').hidden",
        )
        .await?;
    bob.config.api = bob_api;
    bob.running = Some(kith_node::start(bob.config.clone()).await?);
    bob_page
        .wait(
            "the page reconnected",
            "document.getElementById('banner').hidden",
        )
        .await?;
    alice.node().send("bob", "welcome back", None).await?;
    bob_page
        .wait(
            "a message after the restart",
            "[...document.querySelectorAll('.msg.in .text')].some(e => e.textContent === 'welcome back')",
        )
        .await?;
    shots.take(&bob_page, "bob-after-restart").await?;

    // 8. a page without a link shows how to get one.
    bob_page.goto(&format!("http://{}/", api(&alice))).await?;
    bob_page
        .wait(
            "the sign-in notice",
            "!document.getElementById('signin').hidden",
        )
        .await?;
    shots.take(&bob_page, "no-session").await?;

    let blocked = alice_page
        .js("return window.kith.violations", json!([]))
        .await?;
    assert_eq!(blocked, json!([]), "the page keeps to its own policy");
    alice_page.quit().await?;
    bob_page.quit().await?;
    if shots.n < 13 {
        bail!("expected a screenshot per step");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_safety_number_is_shown_marked_verified_and_its_change_warned() -> Result<()> {
    init_logs();
    let Some(driver) = Driver::start().await? else {
        println!(
            "SKIPPED the_safety_number_is_shown_marked_verified_and_its_change_warned: {} or {} \
             is missing (`apt-get install chromium chromium-driver`).",
            kith_tests::webdriver::CHROMEDRIVER,
            kith_tests::webdriver::CHROMIUM
        );
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let alice = TestNode::start("alice", vec![]).await?;
    let mut bob = TestNode::start("bob", vec![]).await?;
    let bob_addr = bob.addr().await;
    add_from_invite(&alice, "bob", &bob).await?;
    add_from_invite(&bob, "alice", &alice).await?;
    let b_id = bob.peer_id().to_string();
    let hello = alice.node().send("bob", "hello", None).await?;
    wait_for("the first message delivered", || async {
        (alice.state(&hello.id) == Some(MessageState::Delivered)).then_some(())
    })
    .await?;
    let at_bob = bob.node().verify_contact("alice", false)?.safety_number;

    let page = driver.browser(&dir.path().join("alice-profile")).await?;
    sign_in(&page, &alice).await?;
    page.click(&conv(&b_id)).await?;
    page.wait("alice's chat with bob", "window.kith.timings.opened >= 1")
        .await?;
    page.click("#btn-info").await?;
    let shown = page
        .wait(
            "the safety number in bob's details",
            "document.querySelector('#panel img.qr')?.naturalWidth > 0 && [...document.querySelectorAll('#panel .safety span')].map(s => s.textContent).join(' ')",
        )
        .await?;
    // The 60 digits alice's page shows are the ones bob's node computes for alice.
    assert_eq!(shown.as_str(), Some(at_bob.as_str()));
    let styled = page
        .js(
            "const s = document.querySelector('#panel .safety');
             return [s.getAttribute('aria-label'), getComputedStyle(s).fontFamily, s.children.length]",
            json!([]),
        )
        .await?;
    assert!(
        styled[0].as_str().is_some_and(|l| l.ends_with(&at_bob)),
        "{styled}"
    );
    assert!(
        styled[1].as_str().is_some_and(|f| f.contains("monospace")),
        "{styled}"
    );
    assert_eq!(styled[2], json!(12));
    assert_eq!(
        page.js(
            "return document.querySelector('#chat-title .verified')",
            json!([])
        )
        .await?,
        Value::Null,
        "not verified yet"
    );

    // alice marks it verified: the ✓ shows in the header and the list, and the node keeps it.
    page.click("#panel button.mark-verified").await?;
    page.wait(
        "the verified mark",
        &format!(
            "document.querySelector('#chat-title .verified') && document.querySelector('{} .verified') && document.querySelector('#panel .trust .verified') && !document.querySelector('#panel button.mark-verified')",
            conv(&b_id).replace('\'', "\\'")
        ),
    )
    .await?;
    assert!(alice.node().verify_contact("bob", false)?.verified);
    let dir_shots = screenshot_dir();
    std::fs::create_dir_all(&dir_shots)?;
    let verified_shot = dir_shots.join("verify-safety-number.png");
    page.screenshot(&verified_shot).await?;
    println!("screenshot: {}", verified_shot.display());

    // bob reinstalls (same peer id, a new identity key) and writes: alice's page warns live.
    bob.stop().await;
    std::fs::remove_dir_all(bob.home.join("db"))?;
    bob.restart_on(bob_addr).await?;
    kith_tests::befriend(&bob, "alice", &alice).await?;
    bob.node().send("alice", "new install", None).await?;
    page.wait(
        "the changed-key warning",
        &format!(
            "!document.getElementById('identity-warning').hidden && document.querySelector('#chat-title .warn') && !document.querySelector('#chat-title .verified') && document.querySelector('{} .warn') && document.querySelector('#panel .warning') && document.querySelector('#panel button.mark-verified')",
            conv(&b_id).replace('\'', "\\'")
        ),
    )
    .await?;
    let changed_shot = dir_shots.join("verify-identity-changed.png");
    page.screenshot(&changed_shot).await?;
    println!("screenshot: {}", changed_shot.display());
    let now = alice.node().verify_contact("bob", false)?;
    assert!(now.identity_changed && !now.verified);
    let shown = page
        .js(
            "return [...document.querySelectorAll('#panel .safety span')].map(s => s.textContent).join(' ')",
            json!([]),
        )
        .await?;
    assert_eq!(shown.as_str(), Some(now.safety_number.as_str()));
    assert_ne!(now.safety_number, at_bob);
    let blocked = page.js("return window.kith.violations", json!([])).await?;
    assert_eq!(blocked, json!([]), "the page keeps to its own policy");
    page.quit().await?;
    Ok(())
}
