//! What a thing read costs over real HTTP, against the cheapest route.
//!
//! Baseline: `GET /healthz` (no auth, no storage). Measured:
//! `GET /v1/things/{id}` with a Bearer JWT — authentication, the app
//! lookup, an SQLite read and Para's JSON rendering. Both run on the same
//! server, over one keep-alive connection on 127.0.0.1, in the same
//! process. Run: `cargo bench -p para-host --bench api_read`.

use para_host::api::{ApiState, router};
use para_host::apps::AppKeys;
use para_host::config::Config;
use para_host::model::{IdGenerator, Thing};
use para_host::runtime::engine::new_engine;
use para_host::runtime::registry::BrokerRegistry;
use para_host::store::sqlite::SqliteStore;
use para_host::store::{Lifecycle, Store};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const REQUESTS: usize = 2000;
const SECRET: &str = "bench-secret";

fn jwt() -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use hmac::{Hmac, Mac};
    let now = para_host::model::now_ms() / 1000;
    let input = format!(
        "{}.{}",
        B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        B64.encode(format!(
            r#"{{"appid":"app:para","iat":{now},"exp":{}}}"#,
            now + 3600
        ))
    );
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes any key"),
    };
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

/// Sends `n` GETs on one keep-alive connection; returns time per request.
fn run(
    addr: std::net::SocketAddr,
    path: &str,
    auth: Option<&str>,
    n: usize,
) -> anyhow::Result<Duration> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if let Some(a) = auth {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    let start = Instant::now();
    for _ in 0..n {
        stream.write_all(req.as_bytes())?;
        let mut len = 0usize;
        let mut line = String::new();
        let mut status_ok = false;
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            if line.starts_with("HTTP/1.1 200") {
                status_ok = true;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
            if line == "\r\n" {
                break;
            }
        }
        anyhow::ensure!(status_ok, "{path} did not answer 200");
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
    }
    Ok(start.elapsed() / n as u32)
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("api-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut raw = BTreeMap::new();
    raw.insert("para.app_secret_key".to_string(), SECRET.to_string());
    let config = Config::from_raw(raw, Vec::new())?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("bench.db"))?);
    let keys = AppKeys::load(&dir.join("bench.key"), None, "para", Some(SECRET.into()))?;
    keys.ensure_root(store.as_ref())?;
    let thing = Thing {
        id: "1".into(),
        appid: "para".into(),
        name: "bench".into(),
        service_broker: "Azure".into(),
        device_state: serde_json::from_str(r#"{"temp":21,"mode":"eco"}"#)?,
        metadata: Default::default(),
        timestamp: 1,
        updated: None,
        version: 1,
        state_updated: 1,
        extra: Default::default(),
    };
    store.insert(&thing, Lifecycle::Active)?;
    let engine = new_engine(None)?;
    let mut no_brokers = config.clone();
    no_brokers.brokers.clear();
    let registry = Arc::new(BrokerRegistry::load(&engine, &no_brokers, store.clone())?);
    let state = Arc::new(ApiState {
        config,
        store,
        registry,
        ids: IdGenerator::new(1),
        keys,
    });
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    rt.spawn(async move {
        let _ = axum::serve(listener, router(state)).await;
    });
    let auth = format!("Bearer {}", jwt());
    let (mut base, mut read) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        base.push(run(addr, "/healthz", None, REQUESTS)?);
        read.push(run(addr, "/v1/things/1", Some(&auth), REQUESTS)?);
    }
    base.sort();
    read.sort();
    let (b, r) = (base[ROUNDS / 2], read[ROUNDS / 2]);
    println!(
        "GET /healthz (baseline):        {b:?} per request (median of {ROUNDS} rounds x {REQUESTS})"
    );
    println!("GET /v1/things/{{id}} with JWT:  {r:?} per request");
    println!(
        "ratio read/baseline:            {:.2}",
        r.as_secs_f64() / b.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
