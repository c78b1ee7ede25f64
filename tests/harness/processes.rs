//! Service binaries run as real OS processes (that a test can SIGTERM or
//! SIGKILL): one at a time ([`ServiceProcess`]) or the three of a test
//! ([`ProcessStack`]), and the Python examples run the same way.

use std::time::Duration;

use crate::{TestEnv, development_config, eventually};

/// A service binary run as a separate OS process, configured only through
/// `ONCEFLOW_*` environment variables. Dropping it kills it, so a failing test
/// leaves no process behind.
#[derive(Debug)]
pub struct ServiceProcess {
    child: std::process::Child,
    /// Where its standard output and error go.
    pub log: std::path::PathBuf,
}

impl ServiceProcess {
    /// The service binary `name` built beside the test executable: the test
    /// runs as `target/<profile>/deps/<test>-<hash>`, the binaries of the
    /// workspace land in `target/<profile>/`. Panics, saying how to build it,
    /// when it is missing.
    pub fn binary(name: &str) -> std::path::PathBuf {
        let exe = std::env::current_exe().expect("the test executable's path");
        let profile_dir = exe.parent().and_then(std::path::Path::parent).expect("target/<profile>/deps/<test>");
        let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        assert!(
            path.is_file(),
            "{} does not exist: build the service binaries before the tests with \
             `cargo build --workspace --bins --locked` (scripts/test.sh does)",
            path.display()
        );
        path
    }

    /// A command running binary `name` without the `ONCEFLOW_*` variables
    /// this process inherited (the caller gives the ones it wants).
    pub fn command(name: &str) -> std::process::Command {
        let mut command = std::process::Command::new(Self::binary(name));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with(onceflow_runtime::config::ENV_PREFIX) {
                command.env_remove(key);
            }
        }
        command
    }

    /// Start binary `name` with exactly the `ONCEFLOW_*` variables in `env`
    /// (inherited ones are removed), appending its output to `log`.
    pub fn spawn(name: &str, env: &[(&str, String)], log: &std::path::Path) -> Self {
        let output = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("service log file");
        let mut command = Self::command(name);
        command
            .envs(env.iter().map(|(key, value)| (key, value)))
            .stdin(std::process::Stdio::null())
            .stdout(output.try_clone().expect("log file handle"))
            .stderr(output);
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { child, log: log.to_owned() }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// `None` while it runs; how it ended once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("process status")
    }

    /// SIGKILL, then reap: no shutdown code runs, nothing is flushed or
    /// committed. Returns once the process is gone.
    pub fn kill(mut self) {
        self.kill_and_reap();
    }

    /// SIGTERM, as an orchestrator stops a service: it shuts down gracefully.
    /// Returns its exit status once it is gone; after `patience` it is
    /// SIGKILLed and `None` is returned.
    pub async fn terminate(mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        let sent = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        assert!(sent.is_ok_and(|status| status.success()), "cannot send SIGTERM to {}", self.child.id());
        let deadline = tokio::time::Instant::now() + patience;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill_and_reap();
        None
    }

    fn kill_and_reap(&mut self) {
        // `Child::kill` sends SIGKILL on Unix; an already exited child is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// A command running `examples/python/<script>` with the Python of those
/// examples' environment, which `ONCEFLOW_TEST_PYTHON` names
/// (`scripts/check-python-examples.sh` makes it and sets the variable).
pub fn python_example(script: &str) -> std::process::Command {
    let python = std::env::var("ONCEFLOW_TEST_PYTHON")
        .expect("ONCEFLOW_TEST_PYTHON names the Python of examples/python (scripts/check-python-examples.sh sets it)");
    let mut command = std::process::Command::new(python);
    command.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python").join(script));
    command
}

/// A free loopback address for a service process to listen on.
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.local_addr().expect("address").to_string()
}

/// Ingest, processor and notifier of one test as processes (the built
/// binaries, see [`ServiceProcess`]), with the test's databases, topics and
/// groups; their logs are in [`ProcessStack::logs`].
#[derive(Debug)]
pub struct ProcessStack {
    pub ingest: String,
    pub processor: String,
    pub notifier: String,
    pub logs: std::path::PathBuf,
    processes: Vec<ServiceProcess>,
}

impl ProcessStack {
    /// The binary names, in start order.
    pub const SERVICES: [&str; 3] = ["onceflow-ingest", "onceflow-processor", "onceflow-notifier"];

    /// The log file of `service` (one of [`Self::SERVICES`]).
    pub fn log(&self, service: &str) -> std::path::PathBuf {
        self.logs.join(format!("{service}.log"))
    }

    /// Panic, naming its log, if a service exited by itself.
    pub fn assert_alive(&mut self) {
        for (service, process) in Self::SERVICES.iter().zip(&mut self.processes) {
            if let Some(status) = process.exit_status() {
                panic!("{service} exited by itself ({status}); see {}", self.log(service).display());
            }
        }
    }

    /// Every line `service` has logged so far.
    pub fn log_lines(&self, service: &str) -> Vec<String> {
        std::fs::read_to_string(self.log(service)).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

impl TestEnv {
    /// Start the three binaries, each with this test's settings and then
    /// `extra(service)` (more variables, `ONCEFLOW_*` or others), and wait
    /// until each answers `/livez`.
    pub async fn spawn_stack(&mut self, extra: impl Fn(&str) -> Vec<(&'static str, String)>) -> ProcessStack {
        let logs = self.scratch_dir();
        let (ingest, processor, notifier) = (free_addr(), free_addr(), free_addr());
        let mut processes = Vec::new();
        for service in ProcessStack::SERVICES {
            let short = service.trim_start_matches("onceflow-");
            let mut env = vec![
                ("ONCEFLOW_DATABASE__URL", self.database(short).url),
                ("ONCEFLOW_KAFKA__BROKERS", self.kafka.brokers.clone()),
                ("ONCEFLOW_KAFKA__TOPIC_PREFIX", self.kafka.topic_prefix.clone()),
                ("ONCEFLOW_KAFKA__PARTITIONS", self.kafka.partitions.to_string()),
            ];
            let addr = match short {
                "ingest" => {
                    env.push(("ONCEFLOW_CONFIG", development_config(short).display().to_string()));
                    env.push(("ONCEFLOW_RESULTS_GROUP_ID", format!("ingest-{}", self.id)));
                    env.push(("ONCEFLOW_SHED__PROCESSOR_GROUP", format!("processor-{}", self.id)));
                    &ingest
                }
                "processor" => {
                    env.push(("ONCEFLOW_GROUP_ID", format!("processor-{}", self.id)));
                    &processor
                }
                _ => {
                    env.push(("ONCEFLOW_CONFIG", development_config(short).display().to_string()));
                    env.push(("ONCEFLOW_GROUP_ID", format!("notifier-{}", self.id)));
                    &notifier
                }
            };
            env.push(("ONCEFLOW_LISTEN", addr.clone()));
            env.extend(extra(service));
            processes.push(ServiceProcess::spawn(service, &env, &logs.join(format!("{service}.log"))));
            let url = format!("http://{addr}/livez");
            eventually(&format!("{service} to answer"), Duration::from_secs(60), || async {
                reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(drop)
            })
            .await;
        }
        ProcessStack { ingest, processor, notifier, logs, processes }
    }
}
