//! The image, compose, Kubernetes and systemd files: every setting is one the relay reads, and
//! ports, probe paths, users and stop timeouts agree with the relay and each other.

use super::*;

pub(super) const DOCKERFILE: &str = "Dockerfile";

pub(super) const COMPOSE: &str = "compose.yaml";

pub(super) const SYSTEMD_UNIT: &str = "systemd/outbox-relay.service";

pub(super) const SCRAPE: &str = "prometheus/scrape.yml";

pub(super) const KUBERNETES: &[&str] = &[
    "kubernetes/deployment.yaml",
    "kubernetes/migrate-job.yaml",
    "kubernetes/secret.example.yaml",
    "kubernetes/service.yaml",
    "kubernetes/servicemonitor.yaml",
];

/// The relay's default OUTBOX_SHUTDOWN_GRACE (README, `run --help`).
pub(super) const DEFAULT_SHUTDOWN_GRACE: &str = "20s";

/// Variables the relay reads that are no clap setting.
pub(super) const ENV_NOT_IN_HELP: &[&str] = &["RUST_LOG"];

/// The variables `outbox-relay <subcommand>` reads: every `[env: NAME=…]` of its `--help`.
pub(super) fn env_vars_of(subcommand: &str) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args([subcommand, "--help"])
        .output()
        .expect("run outbox-relay --help");
    assert!(output.status.success(), "outbox-relay {subcommand} --help");
    let help = String::from_utf8(output.stdout).expect("UTF-8 help");
    let mut vars: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        vars.contains("DATABASE_URL"),
        "{subcommand} --help names no DATABASE_URL: the [env: …] format changed?"
    );
    vars.extend(ENV_NOT_IN_HELP.iter().map(|v| v.to_string()));
    vars
}

/// Fails naming every variable in `set` that `subcommand` does not read.
pub(super) fn assert_reads(subcommand: &str, set: &[String], place: &str) {
    assert!(
        ["run", "migrate"].contains(&subcommand),
        "{place}: runs `outbox-relay {subcommand}`, expected run or migrate"
    );
    let known = env_vars_of(subcommand);
    let unknown: Vec<&String> = set.iter().filter(|v| !known.contains(*v)).collect();
    assert!(
        unknown.is_empty(),
        "{place} sets {unknown:?}, which `outbox-relay {subcommand}` does not read; it reads {known:?}"
    );
}

pub(super) fn yaml_docs(path: &str) -> Vec<Value> {
    let text = read(&deploy_file(path));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{path} is not YAML: {e}"));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{path}: merge keys: {e}"));
            serde_json::to_value(value).unwrap_or_else(|e| panic!("{path}: {e}"))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

pub(super) fn duration(text: &str, place: &str) -> std::time::Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{place}: {text:?}: {e}"))
}

/// The port of an `OUTBOX_HTTP_ADDR` value (`0.0.0.0:8009`, `[::]:8009`).
pub(super) fn addr_port(addr: &str, place: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{place}: OUTBOX_HTTP_ADDR {addr:?} has no port"))
}

pub(super) fn str_at<'a>(value: &'a Value, pointer: &str, place: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{place}: no string at {pointer}"))
}

/// All Kubernetes resources, keyed by "Kind/name".
pub(super) fn kubernetes() -> BTreeMap<String, (String, Value)> {
    let mut resources = BTreeMap::new();
    for path in KUBERNETES {
        for doc in yaml_docs(path) {
            let key = format!(
                "{}/{}",
                str_at(&doc, "/kind", path),
                str_at(&doc, "/metadata/name", path)
            );
            assert!(
                resources
                    .insert(key.clone(), (path.to_string(), doc))
                    .is_none(),
                "{key} is defined twice"
            );
        }
    }
    resources
}

/// The relay's container of a Deployment or Job, with the subcommand it runs.
pub(super) fn relay_container<'a>(resource: &'a Value, place: &str) -> (&'a Value, String) {
    let containers = resource
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{place}: no containers"));
    assert_eq!(containers.len(), 1, "{place}: one container, the relay");
    let container = &containers[0];
    let subcommand = container["args"][0]
        .as_str()
        .unwrap_or_else(|| panic!("{place}: args[0] names the subcommand"))
        .to_string();
    (container, subcommand)
}

/// The user the image runs as (`USER uid:gid`), numeric so runAsNonRoot can check it.
pub(super) fn image_uid() -> u64 {
    let dockerfile = read(&deploy_file(DOCKERFILE));
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("the Dockerfile sets USER");
    user.split(':').next().unwrap().trim().parse().unwrap_or_else(|_| {
        panic!("Dockerfile: USER {user:?} is not numeric: Kubernetes' runAsNonRoot cannot check a name")
    })
}

#[test]
fn kubernetes_manifests_set_only_what_the_relay_reads_and_agree_with_each_other() {
    let resources = kubernetes();
    let get = |key: &str| -> &Value {
        &resources
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in deploy/kubernetes"))
            .1
    };
    let uid = image_uid();

    for (key, subcommand_expected) in [
        ("Deployment/outbox-relay", "run"),
        ("Job/outbox-relay-migrate", "migrate"),
    ] {
        let resource = get(key);
        let (container, subcommand) = relay_container(resource, key);
        assert_eq!(subcommand, subcommand_expected, "{key} runs");
        let mut set: Vec<String> = container["env"]
            .as_array()
            .map(|env| {
                env.iter()
                    .map(|e| str_at(e, "/name", key).to_string())
                    .collect()
            })
            .unwrap_or_default();
        // Every Secret it takes its environment from, as example.
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let secret = str_at(source, "/secretRef/name", key);
            let secret = get(&format!("Secret/{secret}"));
            let data = secret["stringData"]
                .as_object()
                .expect("the example Secrets use stringData");
            set.extend(data.keys().cloned());
            assert!(
                data.values()
                    .all(|v| !v.as_str().unwrap_or("").contains("@")
                        || v.as_str().unwrap().contains(":CHANGE-ME@")),
                "{key}: an example Secret's URL must carry the CHANGE-ME placeholder, never a password"
            );
        }
        assert!(
            set.iter().any(|v| v == "DATABASE_URL"),
            "{key} gets no DATABASE_URL"
        );
        assert_reads(&subcommand, &set, key);

        let pod = &resource["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{key}");
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_u64(),
            Some(uid),
            "{key}: runAsUser is the image's USER"
        );
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"], true,
            "{key}"
        );
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"], false,
            "{key}"
        );
        assert!(
            container["resources"]["requests"].is_object(),
            "{key}: resources"
        );
    }

    // The relay's port: OUTBOX_HTTP_ADDR, the container port, the probes, the Service and
    // the ServiceMonitor all name the same one.
    let deployment = get("Deployment/outbox-relay");
    let (container, _) = relay_container(deployment, "Deployment");
    let env = |name: &str| {
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
    };
    let addr = env("OUTBOX_HTTP_ADDR")
        .expect("the Deployment sets OUTBOX_HTTP_ADDR (the default listens on 127.0.0.1 only)");
    let port = addr_port(addr, "Deployment");
    let ports = container["ports"].as_array().expect("container ports");
    let http = ports
        .iter()
        .find(|p| p["containerPort"].as_u64() == Some(port.into()))
        .unwrap_or_else(|| panic!("no containerPort {port} (OUTBOX_HTTP_ADDR {addr})"));
    let port_name = str_at(http, "/name", "the relay's container port");
    for probe in ["livenessProbe", "readinessProbe"] {
        let probe_port = &container[probe]["httpGet"]["port"];
        assert!(
            probe_port == port_name || probe_port.as_u64() == Some(port.into()),
            "{probe} asks port {probe_port}, the relay listens on {port} ({port_name})"
        );
    }
    // Liveness on /readyz would restart every relay while the database is away.
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");

    let grace = duration(
        env("OUTBOX_SHUTDOWN_GRACE").unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        "OUTBOX_SHUTDOWN_GRACE",
    );
    let termination = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    assert!(
        termination > grace.as_secs(),
        "terminationGracePeriodSeconds {termination} must exceed OUTBOX_SHUTDOWN_GRACE {grace:?}"
    );

    let pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .expect("pod labels");
    let selects_pods = |selector: &Value, place: &str| {
        let selector = selector
            .as_object()
            .unwrap_or_else(|| panic!("{place}: selector"));
        assert!(!selector.is_empty(), "{place}: empty selector");
        for (label, value) in selector {
            assert_eq!(
                pod_labels.get(label),
                Some(value),
                "{place} selects {label}={value}: not the relay pods' label"
            );
        }
    };
    selects_pods(&deployment["spec"]["selector"]["matchLabels"], "Deployment");
    selects_pods(
        &get("PodDisruptionBudget/outbox-relay")["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget",
    );

    // The ServiceMonitor's job label is the Service's name; the alerts select job="outbox-relay".
    let service = get("Service/outbox-relay");
    selects_pods(&service["spec"]["selector"], "Service");
    let service_ports = service["spec"]["ports"].as_array().expect("Service ports");
    let metrics_port = service_ports
        .iter()
        .find(|p| p["targetPort"] == port_name || p["targetPort"].as_u64() == Some(port.into()))
        .unwrap_or_else(|| panic!("the Service has no port targeting {port_name} ({port})"));
    let metrics_port_name = str_at(metrics_port, "/name", "Service port");
    let monitor = get("ServiceMonitor/outbox-relay");
    let service_labels = service["metadata"]["labels"]
        .as_object()
        .expect("Service labels");
    for (label, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("ServiceMonitor selector")
    {
        assert_eq!(
            service_labels.get(label),
            Some(value),
            "the ServiceMonitor selects {label}={value}, the Service lacks it"
        );
    }
    let endpoints = monitor["spec"]["endpoints"].as_array().expect("endpoints");
    assert!(!endpoints.is_empty());
    for endpoint in endpoints {
        assert_eq!(
            endpoint["port"], metrics_port_name,
            "ServiceMonitor endpoint port"
        );
        assert_eq!(endpoint["path"], "/metrics", "ServiceMonitor endpoint path");
    }
}

#[test]
fn compose_services_set_only_what_the_relay_reads() {
    let compose = yaml_docs(COMPOSE).pop().expect("compose.yaml");
    let services = compose["services"].as_object().expect("services");
    let image = |service: &Value| service["image"].as_str().unwrap_or_default().to_string();
    let relay_image = image(&services["relay"]);
    assert!(
        services["relay"]["build"]["dockerfile"] == "deploy/Dockerfile",
        "the relay is built from deploy/Dockerfile"
    );
    let mut relay_services = 0;
    for (name, service) in services {
        if image(service) != relay_image {
            continue;
        }
        relay_services += 1;
        let place = format!("{COMPOSE} service {name}");
        let subcommand = service["command"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{place}: command[0] names the subcommand"));
        let env = service["environment"]
            .as_object()
            .unwrap_or_else(|| panic!("{place}: environment as a map"));
        assert_reads(subcommand, &env.keys().cloned().collect::<Vec<_>>(), &place);
    }
    assert!(relay_services >= 2, "migrate and relay use the relay image");

    let relay = &services["relay"];
    let env = &relay["environment"];
    let port = addr_port(str_at(env, "/OUTBOX_HTTP_ADDR", "relay"), "relay");
    let published = relay["ports"]
        .as_array()
        .expect("relay ports")
        .iter()
        .any(|p| p.as_str().is_some_and(|p| p.ends_with(&format!(":{port}"))));
    assert!(published, "{COMPOSE}: the relay's port {port} is published");
    let check = relay["healthcheck"]["test"]
        .as_array()
        .expect("relay healthcheck")
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        check.contains(&format!("/{port} "))
            && (check.contains("/readyz") || check.contains("/healthz")),
        "{COMPOSE}: the healthcheck asks port {port} for /readyz or /healthz: {check}"
    );
    let grace = duration(
        env["OUTBOX_SHUTDOWN_GRACE"]
            .as_str()
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        "OUTBOX_SHUTDOWN_GRACE",
    );
    let stop = duration(
        relay["stop_grace_period"].as_str().unwrap_or("10s"),
        "stop_grace_period",
    );
    assert!(
        stop > grace,
        "{COMPOSE}: stop_grace_period {stop:?} must exceed OUTBOX_SHUTDOWN_GRACE {grace:?}"
    );
    let after = &relay["depends_on"]["migrate"]["condition"];
    assert_eq!(
        after, "service_completed_successfully",
        "the relay starts after migrate succeeded"
    );
}

#[test]
fn systemd_unit_is_hardened_and_sets_only_what_the_relay_reads() {
    let unit = read(&deploy_file(SYSTEMD_UNIT));
    let mut settings: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';', '[']) {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{SYSTEMD_UNIT}: {line:?}"));
        settings.entry(key.trim()).or_default().push(value.trim());
    }
    let one = |key: &str| -> &str {
        match settings.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{SYSTEMD_UNIT}: expected one {key}=, found {other:?}"),
        }
    };
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(key), value, "{SYSTEMD_UNIT}: {key}");
    }
    assert!(
        one("EnvironmentFile").starts_with('/'),
        "secrets come from an EnvironmentFile"
    );
    let exec = one("ExecStart").split_whitespace().collect::<Vec<_>>();
    assert!(
        exec[0].ends_with("/outbox-relay"),
        "ExecStart runs outbox-relay"
    );
    let mut set = Vec::new();
    let mut grace = DEFAULT_SHUTDOWN_GRACE.to_string();
    for assignment in settings.get("Environment").into_iter().flatten() {
        for pair in assignment.split_whitespace() {
            let (name, value) = pair.trim_matches('"').split_once('=').expect("NAME=value");
            if name == "OUTBOX_SHUTDOWN_GRACE" {
                grace = value.to_string();
            }
            set.push(name.to_string());
        }
    }
    assert_reads(exec[1], &set, SYSTEMD_UNIT);
    let grace = duration(&grace, "OUTBOX_SHUTDOWN_GRACE");
    let stop = duration(&format!("{}s", one("TimeoutStopSec")), "TimeoutStopSec");
    assert!(
        stop > grace,
        "{SYSTEMD_UNIT}: TimeoutStopSec {stop:?} must exceed OUTBOX_SHUTDOWN_GRACE {grace:?}"
    );
}

#[test]
fn dockerfile_and_scrape_config_use_the_relay_port() {
    let dockerfile = read(&deploy_file(DOCKERFILE));
    // ENV lines, continued with backslashes, are NAME=value pairs.
    let joined = dockerfile.replace("\\\n", " ");
    let mut set = Vec::new();
    let mut addr = None;
    for line in joined.lines().filter_map(|l| l.trim().strip_prefix("ENV ")) {
        for pair in line.split_whitespace() {
            let (name, value) = pair.split_once('=').expect("ENV NAME=value");
            if name == "OUTBOX_HTTP_ADDR" {
                addr = Some(value.to_string());
            }
            set.push(name.to_string());
        }
    }
    assert_reads("run", &set, DOCKERFILE);
    let addr =
        addr.expect("the image sets OUTBOX_HTTP_ADDR (the default listens on 127.0.0.1 only)");
    let port = addr_port(&addr, DOCKERFILE);
    assert!(
        dockerfile.contains(&format!("\nEXPOSE {port}\n")),
        "{DOCKERFILE}: EXPOSE {port}"
    );
    let healthcheck = joined
        .lines()
        .find(|l| l.trim_start().starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    assert!(
        healthcheck.contains("${OUTBOX_HTTP_ADDR##*:}") && healthcheck.contains("GET /healthz "),
        "{DOCKERFILE}: the HEALTHCHECK asks /healthz on OUTBOX_HTTP_ADDR's port"
    );

    let scrape = yaml_docs(SCRAPE).pop().expect("scrape.yml");
    for target in scrape
        .pointer("/0/static_configs/0/targets")
        .and_then(Value::as_array)
        .expect("targets")
    {
        let target = target.as_str().expect("target");
        assert!(
            target.ends_with(&format!(":{port}")),
            "{SCRAPE}: {target} is not the relay's port {port}"
        );
    }
}

/// The paths the probes, the healthchecks and the ServiceMonitor ask answer 200 on a real,
/// ready relay.
#[tokio::test]
async fn the_paths_the_deploy_files_ask_answer_on_a_real_relay() {
    let mut paths = BTreeSet::new();
    let resources = kubernetes();
    let (_, deployment) = &resources["Deployment/outbox-relay"];
    let (container, _) = relay_container(deployment, "Deployment");
    for probe in ["livenessProbe", "readinessProbe"] {
        paths.insert(str_at(container, &format!("/{probe}/httpGet/path"), probe).to_string());
    }
    let (_, monitor) = &resources["ServiceMonitor/outbox-relay"];
    for endpoint in monitor["spec"]["endpoints"].as_array().expect("endpoints") {
        paths.insert(str_at(endpoint, "/path", "ServiceMonitor").to_string());
    }
    let dockerfile = read(&deploy_file(DOCKERFILE));
    let compose = read(&deploy_file(COMPOSE));
    for text in [&dockerfile, &compose] {
        for (at, _) in text.match_indices("GET /") {
            let path = text[at + 4..].split(' ').next().unwrap();
            paths.insert(path.to_string());
        }
    }
    assert!(paths.len() >= 3, "found {paths:?}");

    let db = TestDb::new().await;
    let relay = spawn_default_relay(&db).await;
    wait_until_ready("the relay is ready", &relay.health).await;
    for path in &paths {
        let url = format!("http://{}{path}", relay.http_addr);
        let response = reqwest::get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(response.status(), 200, "GET {path}, asked by a deploy file");
    }
    relay.shutdown().await;
}
