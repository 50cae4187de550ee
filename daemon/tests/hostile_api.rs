//! The API against a hostile or careless client (issue 13, finding 11): a page
//! whose DNS name rebinds to 127.0.0.1, a listen address open to the network,
//! requests over every limit, HEAD, and control characters in params. The real
//! daemon, spoken to over raw TCP where a client library would tidy the request.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::Value;

use crate::common::{Project, plugin, stderr};
use crate::daemon::Daemon;

/// One raw HTTP/1.1 exchange: (status, head, body). The request is written on a
/// thread while the answer is read, so an early answer to an oversized request
/// (before the server has read it all) still arrives.
fn exchange(d: &Daemon, request: Vec<u8>) -> (u16, String, String) {
    let addr = d.url().trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&request);
    });
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let _ = writer.join();
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head.to_string(), body.to_string())
}

/// A request with `Connection: close` and the given Host (none if empty).
fn request(method: &str, target: &str, host: &str, extra: &str) -> Vec<u8> {
    let host = if host.is_empty() {
        String::new()
    } else {
        format!("Host: {host}\r\n")
    };
    format!("{method} {target} HTTP/1.1\r\n{host}Connection: close\r\n{extra}\r\n").into_bytes()
}

/// The error shape, with the status it repeats.
fn assert_error_shape(status: u16, body: &str, what: &str) -> String {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: {status} is not JSON ({e}): {body:?}"));
    assert_eq!(v["error"]["status"], status, "{what}: {v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: no message: {v}");
    message.to_string()
}

fn noop_pipeline(p: &Project) {
    let chatty = plugin("chatty");
    p.write(
        "pipelines/p.toml",
        &format!(
            "[params]\nc = \"x\"\n[[step]]\nname = \"a\"\nwasm = \"{chatty}\"\nargs = [\"--lines\", \"3\"]\n"
        ),
    );
}

fn daemon_config(p: &Project, api: &str) {
    p.write(
        "millrace.toml",
        &format!(
            "pipelines = \"pipelines\"\nstate_dir = \".state\"\nmax_parallel_steps = 2\nshutdown_grace = \"2s\"\n[api]\n{api}\n"
        ),
    );
}

#[test]
fn a_rebinding_host_is_refused_and_our_own_names_are_served() {
    let p = Project::new();
    noop_pipeline(&p);
    daemon_config(
        &p,
        "listen = \"127.0.0.1:0\"\nallowed_hosts = [\"millrace.test\", \"10.1.2.3\"]",
    );
    let d = Daemon::start(&p);
    let id = d.trigger("p");
    d.wait_status(id, "succeeded");
    let log = format!("/api/v1/runs/{id}/steps/a/logs");
    let port = d.url().rsplit(':').next().unwrap().to_string();
    // A page at http://evil.example:PORT whose name now resolves to 127.0.0.1:
    // the browser sends its own name. Nothing of the log comes back.
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        "10.9.9.9".to_string(),
    ] {
        for path in [log.as_str(), "/api/v1/status", "/healthz", "/"] {
            let (status, _, body) = exchange(&d, request("GET", path, &host, ""));
            assert_eq!(status, 421, "GET {path} for {host}: {body}");
            let m = assert_error_shape(status, &body, &host);
            assert!(m.contains("allowed_hosts"), "{m}");
        }
    }
    // Mutations too, even with the token.
    let auth = format!(
        "Authorization: Bearer {}\r\nContent-Length: 0\r\n",
        d.token()
    );
    let (status, _, _) = exchange(
        &d,
        request("POST", "/api/v1/pipelines/p/runs", "evil.example", &auth),
    );
    assert_eq!(status, 421);
    // An absolute-form target names the host too (and wins over `Host`).
    let (status, _, _) = exchange(
        &d,
        request("GET", &format!("http://evil.example{log}"), "127.0.0.1", ""),
    );
    assert_eq!(status, 421);
    // No Host at all (HTTP/1.0 style).
    let (status, _, body) = exchange(&d, b"GET /api/v1/status HTTP/1.0\r\n\r\n".to_vec());
    assert_eq!(status, 400, "{body}");
    assert_error_shape(status, &body, "no Host");
    // Loopback names and addresses, and the configured names, are ours.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LocalHost.".to_string(),
        format!("ui.localhost:{port}"),
        format!("[::1]:{port}"),
        "millrace.test".to_string(),
        format!("Millrace.Test:{port}"),
        "10.1.2.3:443".to_string(),
    ] {
        let (status, _, body) = exchange(&d, request("GET", &log, &host, ""));
        assert_eq!(status, 200, "{host}: {body}");
        assert!(body.contains("stdout line 0000000002"), "{host}: {body}");
    }
    assert_eq!(d.runs("p").len(), 1, "the refused POST made no run");
    assert_eq!(d.stop(), 0);

    // A bad entry is a configuration error at its line, before anything starts.
    daemon_config(
        &p,
        "listen = \"127.0.0.1:0\"\nallowed_hosts = [\"http://x.test:80\"]",
    );
    let out = p.run(&["validate", "--config", "millrace.toml", "--config-only"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "millrace.toml:7:18: error: api.allowed_hosts: `http://x.test:80` is not a host"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_listen_address_open_to_the_network_with_public_reads_is_warned_about() {
    let p = Project::new();
    noop_pipeline(&p);
    daemon_config(&p, "listen = \"0.0.0.0:0\"");
    let d = Daemon::start(&p);
    // Listening on every address, the daemon answers to any of the machine's
    // addresses (an address cannot rebind), not to names it was not given.
    let (status, _, _) = exchange(&d, request("GET", "/healthz", "192.0.2.7:8640", ""));
    assert_eq!(status, 200);
    let (status, _, _) = exchange(&d, request("GET", "/healthz", "evil.example", ""));
    assert_eq!(status, 421);
    let log = d.log_text();
    assert!(
        log.contains("WARN")
            && log.contains("which is not a loopback address, and `public_read = true`")
            && log.contains("reads every pipeline, run, param and step log without a token"),
        "{log}"
    );
    assert_eq!(d.stop(), 0);
    // Reads behind the token, or a loopback listen: nothing to warn about.
    for api in [
        "listen = \"0.0.0.0:0\"\npublic_read = false",
        "listen = \"127.0.0.1:0\"",
    ] {
        daemon_config(&p, api);
        let d = Daemon::start(&p);
        d.get("/healthz");
        assert!(!d.log_text().contains("not a loopback address"), "{api}");
        assert_eq!(d.stop(), 0);
    }
}

#[test]
fn every_error_the_api_or_its_layers_answer_has_the_error_shape() {
    let p = Project::new();
    noop_pipeline(&p);
    let d = Daemon::start(&p);
    let token = d.token().to_string();
    let auth = format!("Authorization: Bearer {token}\r\n");
    let many = |n: usize| -> String { (0..n).map(|i| format!("X-H{i}: v\r\n")).collect() };
    let body = |len: usize| -> Vec<u8> {
        let mut r = request(
            "POST",
            "/api/v1/pipelines/p/runs",
            "127.0.0.1",
            &format!("{auth}Content-Type: application/json\r\nContent-Length: {len}\r\n"),
        );
        r.extend(std::iter::repeat_n(b' ', len));
        r
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("a body over 1 MiB", body(3 << 20), 413),
        (
            "101 header fields",
            request("GET", "/healthz", "127.0.0.1", &many(101)),
            431,
        ),
        // Beyond hyper's own limit of 512 fields, hyper answers by itself.
        (
            "600 header fields",
            request("GET", "/healthz", "127.0.0.1", &many(600)),
            431,
        ),
        (
            "a 100 KiB header",
            request(
                "GET",
                "/healthz",
                "127.0.0.1",
                &format!("X-Big: {}\r\n", "a".repeat(100 << 10)),
            ),
            431,
        ),
        (
            "a 700 KiB header",
            request(
                "GET",
                "/healthz",
                "127.0.0.1",
                &format!("X-Big: {}\r\n", "a".repeat(700 << 10)),
            ),
            431,
        ),
        (
            "a 10 KiB URI",
            request(
                "GET",
                &format!("/{}", "a".repeat(10 << 10)),
                "127.0.0.1",
                "",
            ),
            414,
        ),
        (
            "a 70 KiB URI",
            request(
                "GET",
                &format!("/{}", "a".repeat(70 << 10)),
                "127.0.0.1",
                "",
            ),
            414,
        ),
        ("not HTTP", b"HELLO\r\n\r\n".to_vec(), 400),
        (
            "a bad query",
            request("GET", "/api/v1/runs?limit=ten", "127.0.0.1", ""),
            400,
        ),
        (
            "a bad log query",
            request(
                "GET",
                "/api/v1/runs/1/steps/a/logs?attempt=-1",
                "127.0.0.1",
                "",
            ),
            400,
        ),
        (
            "malformed JSON",
            {
                let mut r = request(
                    "POST",
                    "/api/v1/pipelines/p/runs",
                    "127.0.0.1",
                    &format!("{auth}Content-Length: 1\r\n"),
                );
                r.push(b'{');
                r
            },
            400,
        ),
        (
            "no token",
            request(
                "POST",
                "/api/v1/runs/1/cancel",
                "127.0.0.1",
                "Content-Length: 0\r\n",
            ),
            401,
        ),
        (
            "no route",
            request("GET", "/api/v2/nothing", "127.0.0.1", ""),
            404,
        ),
        (
            "no run",
            request("GET", "/api/v1/runs/99", "127.0.0.1", ""),
            404,
        ),
        (
            "wrong method",
            request("DELETE", "/api/v1/runs", "127.0.0.1", &auth),
            405,
        ),
        (
            "a foreign host",
            request("GET", "/api/v1/runs", "evil.example", ""),
            421,
        ),
    ];
    for (what, req, expected) in cases {
        let (status, head, body) = exchange(&d, req);
        assert_eq!(status, expected, "{what}: {head}\n{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{what}: {head}"
        );
        let m = assert_error_shape(status, &body, what);
        if expected == 413 {
            assert!(m.contains("1 MiB"), "{m}");
        }
        // The daemon serves on.
        assert_eq!(d.get("/healthz")["status"], "ok", "after {what}");
    }
    assert!(d.runs("p").is_empty(), "no request above made a run");
    let (status, head, _) = exchange(
        &d,
        request(
            "POST",
            "/api/v1/runs/1/cancel",
            "127.0.0.1",
            "Content-Length: 0\r\n",
        ),
    );
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    assert_eq!(d.stop(), 0);
}

#[test]
fn head_answers_as_get_does_on_every_route() {
    let p = Project::new();
    noop_pipeline(&p);
    let d = Daemon::start(&p);
    let id = d.trigger("p");
    d.wait_status(id, "succeeded");
    let paths = [
        "/healthz".to_string(),
        "/".to_string(),
        "/metrics".to_string(),
        "/api/v1/openapi.json".to_string(),
        "/api/v1/status".to_string(),
        "/api/v1/pipelines".to_string(),
        "/api/v1/pipelines/p".to_string(),
        "/api/v1/pipelines/nope".to_string(),
        "/api/v1/pipelines/p/runs".to_string(),
        "/api/v1/runs".to_string(),
        "/api/v1/runs?status=bogus".to_string(),
        format!("/api/v1/runs/{id}"),
        "/api/v1/runs/99".to_string(),
        format!("/api/v1/runs/{id}/metrics"),
        format!("/api/v1/runs/{id}/steps/a/logs"),
        format!("/api/v1/runs/{id}/cancel"),
        "/api/v1/modules".to_string(),
        "/nothing".to_string(),
    ];
    let compare = |d: &Daemon, auth: &str| {
        for path in &paths {
            let (get, _, get_body) = exchange(d, request("GET", path, "127.0.0.1", auth));
            let (head, head_text, head_body) =
                exchange(d, request("HEAD", path, "127.0.0.1", auth));
            assert_eq!(
                head, get,
                "HEAD {path} ({auth:?}): {head_text}\nGET said {get_body}"
            );
            assert!(head_body.is_empty(), "HEAD {path} has a body: {head_body}");
        }
    };
    compare(&d, "");
    let (status, _, _) = exchange(&d, request("HEAD", "/api/v1/status", "127.0.0.1", ""));
    assert_eq!(status, 200, "reads are public by default");
    assert_eq!(d.stop(), 0);
    // Reads behind the token: HEAD needs it exactly where GET does.
    daemon_config(&p, "listen = \"127.0.0.1:0\"\npublic_read = false");
    let d = Daemon::start(&p);
    compare(&d, "");
    compare(&d, &format!("Authorization: Bearer {}\r\n", d.token()));
    let (status, _, _) = exchange(&d, request("HEAD", "/api/v1/status", "127.0.0.1", ""));
    assert_eq!(status, 401);
    assert_eq!(d.stop(), 0);
}

#[test]
fn control_characters_in_param_values_are_refused_from_the_api_and_the_cli() {
    let p = Project::new();
    noop_pipeline(&p);
    let d = Daemon::start(&p);
    for (value, shown) in [
        ("a\u{0}b", "U+0000 at byte 1"),
        ("\u{1b}[2J", "U+001B at byte 0"),
        ("ok\r", "U+000D at byte 2"),
        ("\u{9b}31m", "U+009B at byte 0"),
    ] {
        let (status, v) = d.post(
            "/api/v1/pipelines/p/runs",
            serde_json::json!({ "params": { "c": value } }),
            None,
        );
        assert_eq!(status, 422, "{value:?}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains("param `c`") && m.contains(shown), "{m}");
    }
    assert!(d.runs("p").is_empty(), "no run was made");
    // Tab and newline are text.
    let (status, v) = d.post(
        "/api/v1/pipelines/p/runs",
        serde_json::json!({ "params": { "c": "two\tcolumns\nand lines" } }),
        None,
    );
    assert_eq!(status, 202, "{v}");
    let id = v["run_id"].as_i64().unwrap();
    let r = d.wait_status(id, "succeeded");
    assert_eq!(r["params"]["c"], "two\tcolumns\nand lines");
    // The command line: a usage error, before anything runs or is sent.
    let f = p.path("pipelines/p.toml");
    let f = f.to_str().unwrap();
    for args in [
        vec!["run", f, "--param", "c=\u{1b}]0;pwned\u{7}"],
        vec!["plan", f, "--param", "c=a\u{1}b"],
        vec!["trigger", "p", "--param", "c=a\u{7f}"],
    ] {
        let out = p.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("error: param `c`: its value has the control character"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(d.runs("p").len(), 1);
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_request_with_two_host_headers_is_refused() {
    let p = Project::new();
    let d = Daemon::start(&p);
    let (status, _, body) = exchange(
        &d,
        request(
            "GET",
            "/api/v1/status",
            "127.0.0.1",
            "Host: evil.example\r\n",
        ),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("more than one `Host`"), "{body}");
    // One Host of ours is still served.
    let (status, _, _) = exchange(&d, request("GET", "/healthz", "127.0.0.1", ""));
    assert_eq!(status, 200);
    assert_eq!(d.stop(), 0);
}
