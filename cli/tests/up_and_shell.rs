//! `troupe up --no-shell` brings up a real 3-node cluster of `troupe node` processes serving
//! a model; Embed works on every node; `troupe shell -c` runs every shell command against it;
//! the interactive shell works through a tmux pseudo-terminal (typing, Tab completion,
//! history); SIGTERM stops every node; a second `up` on the same data dir resumes the
//! cluster without pushing again.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_troupe");

/// A base port whose 3 nodes' ports (base + 10·i + 0..=2) are all free now.
fn free_base_port() -> u16 {
    let seed = std::process::id() as u16;
    for attempt in 0..200u16 {
        let base = 20_000 + (seed.wrapping_mul(31).wrapping_add(attempt * 97) % 30_000);
        let free = (0..3)
            .all(|i| (0..3).all(|p| TcpListener::bind(("127.0.0.1", base + 10 * i + p)).is_ok()));
        if free {
            return base;
        }
    }
    panic!("no free base port found");
}

/// A running `troupe up`, its stdout lines arriving on `lines`.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    fn start(data_dir: &std::path::Path, model: &std::path::Path, base: u16) -> Up {
        let mut child = Command::new(BIN)
            .args(["up", "--no-shell", "--nodes", "3"])
            .args(["--base-port", &base.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--model")
            .arg(model)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Up {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stdout line containing `text`.
    fn wait_line(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.seen.iter().any(|l| l.contains(text)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no line with {text:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// SIGTERM, then the exit code.
    fn stop(mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let status = self.child.wait().unwrap();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        status.code()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The certificates `troupe up` made, which every client of its cluster needs.
static CERTS: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// TROUPE_CA, and the admin token `up` minted (TROUPE_TOKEN_FILE), for `up`'s cluster.
fn client_env() -> Vec<(&'static str, String)> {
    let certs = CERTS.lock().unwrap().clone().expect("up's certificates");
    [
        ("TROUPE_CA", "ca.crt"),
        ("TROUPE_TOKEN_FILE", "../admin.token"),
    ]
    .into_iter()
    .map(|(name, file)| (name, certs.join(file).display().to_string()))
    .collect()
}

/// `troupe shell --addr ADDR -c LINE` with the admin's certificate: (exit code, stdout,
/// stderr).
fn shell(addr: &str, line: &str) -> (i32, String, String) {
    let output = Command::new(BIN)
        .args(["shell", "--addr", addr, "-c", line])
        .envs(client_env())
        .output()
        .unwrap();
    let (out, err) = text(&output);
    (output.status.code().unwrap_or(-1), out, err)
}

fn shell_ok(addr: &str, line: &str) -> String {
    let (code, out, err) = shell(addr, line);
    assert_eq!(code, 0, "{line:?} failed: {err}\n{out}");
    out
}

fn shell_json(addr: &str, line: &str) -> serde_json::Value {
    let out = shell_ok(addr, &format!("{line} --json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{line:?}: not JSON ({e}): {out}"))
}

async fn embed_on(addr: &str, model: &str) -> troupe_proto::v1::EmbedResponse {
    let certs = CERTS.lock().unwrap().clone().expect("up's certificates");
    let tls = troupe_transport::ClientTls {
        ca: certs.join("ca.crt"),
        identity: None,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let channel = troupe_transport::connect_client(endpoint, Some(tls.config().unwrap()))
        .await
        .unwrap();
    // The admin token `up` minted next to its certificates.
    let token = std::fs::read_to_string(certs.parent().unwrap().join("admin.token")).unwrap();
    let mut client =
        troupe_proto::v1::inference_client::InferenceClient::new(authed(channel, token.trim()));
    client
        .embed(embed_request(model, &["a text to embed"], ""))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_a_three_node_cluster_and_the_shell_drives_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let data = dir.path().join("cluster");
    let base = free_base_port();
    let apis: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", base + 10 * i))
        .collect();
    let api = apis[0].clone();

    let mut up = Up::start(&data, &model, base);
    up.wait_line("serving until SIGINT or SIGTERM", Duration::from_secs(120));
    assert!(up.seen.iter().any(|l| l.contains("formed the cluster")));
    // The cluster runs TLS, and up says what another terminal needs to reach it.
    let certs = data.join("certs");
    let export = format!("export TROUPE_CA={}", certs.join("ca.crt").display());
    assert!(up.seen.iter().any(|l| l.contains(&export)), "{:?}", up.seen);
    assert!(
        up.seen.iter().any(|l| l.contains("TROUPE_TOKEN_FILE=")),
        "up names the admin token it minted: {:?}",
        up.seen
    );
    *CERTS.lock().unwrap() = Some(certs);
    let (code, _, err) = {
        let output = Command::new(BIN)
            .args(["shell", "--addr", &apis[0], "-c", "status"])
            .env_remove("TROUPE_CA")
            .output()
            .unwrap();
        let (out, err) = text(&output);
        (output.status.code(), out, err)
    };
    assert_ne!(code, Some(0));
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("--ca"),
        "{err}"
    );
    assert!(up.seen.iter().any(|l| l.contains("pushing tiny")));
    for (i, addr) in apis.iter().enumerate() {
        let metrics = format!("127.0.0.1:{}", base + 10 * i as u16 + 2);
        assert!(
            up.seen
                .iter()
                .any(|l| l.contains(addr.as_str()) && l.contains(&metrics)),
            "endpoints of node {} not printed: {:?}",
            i + 1,
            up.seen
        );
        let reply = embed_on(addr, "tiny").await;
        assert_eq!(reply.embeddings.len(), 1);
        assert!(!reply.embeddings[0].values.is_empty());
    }

    // Every shell command through -c.
    let status = shell_ok(&api, "status");
    assert!(status.contains("leader: "), "{status}");
    let nodes = shell_json(&api, "nodes");
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n["voter"] == true));
    assert_eq!(nodes[0]["seen_as"], "self");
    let raft = shell_json(&api, "raft");
    assert_eq!(raft["voters"], serde_json::json!([1, 2, 3]));
    assert!(raft["applied_revision"].as_u64().unwrap() >= 2);
    let models = shell_json(&api, "models list");
    assert_eq!(models[0]["name"], "tiny");
    assert_eq!(models[0]["state"], "active");
    let version = models[0]["version"].as_str().unwrap().to_owned();
    assert!(shell_ok(&api, "models").contains(&version));

    let set = shell_json(&api, "priorities set search 7");
    let set_revision = set["revision"].as_u64().unwrap();
    let tasks = shell_json(&api, "priorities");
    assert_eq!(tasks[0]["name"], "search");
    assert_eq!(tasks[0]["priority"], 7);
    // A CAS against a stale revision fails, naming the current one.
    let (code, _, err) = shell(
        &api,
        &format!(
            "priorities set search 9 --expected-revision {}",
            set_revision - 1
        ),
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&set_revision.to_string()), "{err}");
    shell_ok(&api, "priorities set search 8");

    // history: the state as of the first write still has no tasks; as of set_revision the
    // priority 7.
    let then = shell_json(&api, &format!("history {set_revision}"));
    assert_eq!(then["tasks"][0]["priority"], 7);
    let first = shell_json(&api, "history 1");
    assert_eq!(first["tasks"], serde_json::json!([]));
    assert_eq!(first["models"][0]["state"], "loading");
    let (code, _, err) = shell(&api, "history 999999");
    assert_ne!(code, 0);
    assert!(
        err.contains("ahead of this node's applied revision"),
        "{err}"
    );

    // actors on this node and on node 2, and a restart through the supervisor.
    let tree = shell_json(&api, "actors");
    assert_eq!(tree["serving"], true);
    let health = |tree: &serde_json::Value| {
        tree["actors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["path"] == "node/health")
            .map(|a| a["restarts"].as_u64().unwrap())
            .unwrap()
    };
    let before = health(&shell_json(&api, "actors 2"));
    let restarted = shell_json(&api, "actor restart node/health --node 2");
    assert_eq!(restarted["restarts"].as_u64().unwrap(), before + 1);
    assert_eq!(health(&shell_json(&api, "actors 2")), before + 1);
    let (code, _, err) = shell(&api, "actor restart node/nothing");
    assert_ne!(code, 0);
    assert!(err.contains("no actor at"), "{err}");

    // watch replays from a revision and stops after --count changes.
    let watched = shell_ok(&api, &format!("watch --from {set_revision} --count 2"));
    let lines: Vec<&str> = watched.lines().collect();
    assert_eq!(lines.len(), 2, "{watched}");
    assert!(lines[0].contains("tasks/search"), "{watched}");

    // embed and similar.
    let embedded = shell_json(&api, "embed hello there");
    assert_eq!(embedded["model"], "tiny");
    assert!(!embedded["embedding"].as_array().unwrap().is_empty());
    let same = shell_json(&api, "similar the same words | the same words");
    assert!(
        (same["cosine"].as_f64().unwrap() - 1.0).abs() < 1e-4,
        "{same}"
    );
    let scored = shell_ok(&api, "similar a cat | stock prices");
    assert!(scored.starts_with("cosine "), "{scored}");

    // help, and errors exit non-zero.
    assert!(shell_ok(&api, "help").contains("similar"));
    let (code, _, err) = shell(&api, "bogus");
    assert_eq!(code, 2);
    assert!(err.contains("unrecognized subcommand"), "{err}");
    let (code, _, _) = shell("127.0.0.1:1", "status");
    assert_ne!(code, 0);

    interactive_session(&api, dir.path());

    assert_eq!(up.stop(), Some(0));
    // Every node process is gone: their ports are free again.
    for i in 0..3 {
        for p in 0..3 {
            let port = base + 10 * i + p;
            assert!(
                TcpListener::bind(("127.0.0.1", port)).is_ok(),
                "port {port} still taken after up stopped"
            );
        }
    }

    // The same data dir again: the same cluster, nothing pushed, the version still active.
    let mut again = Up::start(&data, &model, base);
    again.wait_line("serving until SIGINT or SIGTERM", Duration::from_secs(120));
    assert!(again
        .seen
        .iter()
        .any(|l| l.contains("resuming the cluster")));
    assert!(
        !again.seen.iter().any(|l| l.contains("pushing")),
        "{:?}",
        again.seen
    );
    let models = shell_json(&api, "models");
    assert_eq!(models[0]["version"], version.as_str());
    assert_eq!(models[0]["state"], "active");
    assert_eq!(shell_json(&api, "priorities")[0]["priority"], 8);
    assert_eq!(embed_on(&apis[2], "tiny").await.model_version, version);
    assert_eq!(again.stop(), Some(0));

    // A different layout on the same data dir is refused, naming the one it holds.
    let output = Command::new(BIN)
        .args(["up", "--no-shell", "--nodes", "2", "--base-port"])
        .arg(base.to_string())
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output).1.contains("holds a cluster of 3 nodes"));
}

/// The interactive shell in a tmux pane: type commands, read the screen.
fn interactive_session(api: &str, dir: &std::path::Path) {
    let session = format!("troupe-shell-{}", std::process::id());
    let history_dir = dir.join("shell-home");
    let tmux = |args: &[&str]| {
        let output = Command::new("tmux").args(args).output().unwrap();
        assert!(output.status.success(), "tmux {args:?}: {:?}", output);
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let env: Vec<String> = client_env()
        .into_iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    let exit_file = dir.join("shell-exit");
    let command = format!(
        "env {} {BIN} shell --addr {api} --data-dir {}; echo \"exit $?\" > {}",
        env.join(" "),
        history_dir.display(),
        exit_file.display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "200",
        "-y",
        "50",
        &command,
    ]);
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _kill = Kill(session.clone());
    // The pane stays after the shell exits, so its last screen can be read.
    tmux(&["set-option", "-t", &session, "remain-on-exit", "on"]);
    let screen = || tmux(&["capture-pane", "-p", "-t", &session, "-S", "-200"]);
    let wait_screen = |what: &str| {
        troupe_wait::expect_blocking(
            &format!("{what:?} on the screen"),
            Duration::from_secs(30),
            || {
                let shown = screen();
                shown.contains(what).then_some(shown)
            },
        )
    };
    wait_screen(&format!("troupe {api}>"));
    // Tab completes the command name.
    tmux(&["send-keys", "-t", &session, "sta", "Tab"]);
    wait_screen("> status");
    tmux(&["send-keys", "-t", &session, "Enter"]);
    wait_screen("leader: ");
    // Tab completes the model name after `models retire`.
    tmux(&["send-keys", "-t", &session, "models retire ti", "Tab"]);
    wait_screen("models retire tiny");
    tmux(&["send-keys", "-t", &session, "C-u"]);
    tmux(&["send-keys", "-t", &session, "similar one | one", "Enter"]);
    wait_screen("cosine 1.0000");
    // A failing command prints its error and the shell goes on.
    tmux(&["send-keys", "-t", &session, "history 999999", "Enter"]);
    wait_screen("ahead of this node's applied revision");
    tmux(&["send-keys", "-t", &session, "raft", "Enter"]);
    wait_screen("committed index");
    tmux(&["send-keys", "-t", &session, "quit", "Enter"]);
    // `quit` ends the shell with status 0, its history saved. The pane's shell writes the
    // status to a file: tmux's own record of it (#{pane_dead_status}) stayed empty in a
    // fresh-clone CI run although the pane was dead.
    let exit = troupe_wait::expect_blocking(
        "the shell to exit after quit",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&exit_file)
                .ok()
                .filter(|exit| exit.ends_with('\n'))
        },
    );
    assert_eq!(exit, "exit 0\n", "the shell's exit status\n{}", screen());
    let saved = std::fs::read_to_string(history_dir.join("shell_history")).unwrap();
    for typed in ["status", "similar one | one", "raft", "quit"] {
        assert!(
            saved.contains(typed),
            "{typed:?} not in the history:\n{saved}"
        );
    }
}
