//! The Helm chart in deploy/helm/egress-gateway-agent: it lints, its default values render
//! exactly what `kubectl kustomize deploy/` does, and each value reaches the objects a user
//! expects it to change. Needs helm (`cargo xtask setup` installs it in .tools/bin); kubectl
//! only for the comparison with deploy/. No cluster needed.
#![expect(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{
    collections::BTreeMap,
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

const CHART: &str = "deploy/helm/egress-gateway-agent";
const RELEASE: &str = "egress-gateway-agent";
/// Where deploy/ puts the agent.
const PLAIN_NAMESPACE: &str = "kube-system";

fn workspace() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// An executable `name` in one of the PATH folders.
fn on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// The helm `cargo xtask setup` installs (the version the chart is tested with), else the one
/// on PATH. Missing helm fails the test: setup installs it, so a skip would hide a broken
/// setup.
fn helm() -> PathBuf {
    let installed = workspace().join(".tools/bin/helm");
    if installed.is_file() {
        return installed;
    }
    on_path("helm").unwrap_or_else(|| {
        panic!(
            "helm is neither in {} nor on PATH: run `cargo xtask setup`",
            installed.display()
        )
    })
}

/// Runs `cmd` in the workspace and returns its standard output.
fn output(cmd: &mut Command) -> Result<String> {
    cmd.current_dir(workspace());
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed non-UTF-8"))
}

/// Objects by `Kind namespace/name` (`Kind name` when cluster-scoped), as JSON.
type Objects = BTreeMap<String, Value>;

fn key(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("<no kind>");
    let name = object["metadata"]["name"].as_str().unwrap_or("<no name>");
    match object["metadata"]["namespace"].as_str() {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The objects of a multi-document YAML text; `source` names it in errors.
fn objects(text: &str, source: &str) -> Result<Objects> {
    let mut objects = Objects::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let yaml: serde_yaml::Value = serde::Deserialize::deserialize(document)
            .with_context(|| format!("{source}: not YAML"))?;
        let object = serde_json::to_value(yaml)?;
        if object.is_null() {
            continue;
        }
        let key = key(&object);
        ensure!(
            objects.insert(key.clone(), object).is_none(),
            "{source}: {key} twice"
        );
    }
    Ok(objects)
}

/// `helm template` of the chart in `namespace`, with `args` (values) added.
fn render(namespace: &str, args: &[&str]) -> Result<Objects> {
    let text = output(
        Command::new(helm())
            .args(["template", RELEASE, CHART, "--namespace", namespace])
            .args(args),
    )?;
    objects(&text, "helm template")
}

/// The one object of `kind` named `name` in `objects`.
fn object<'a>(objects: &'a Objects, kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .values()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    match found.as_slice() {
        [one] => one,
        _ => panic!(
            "expected one {kind} {name}, found {}; rendered: {:?}",
            found.len(),
            objects.keys().collect::<Vec<_>>()
        ),
    }
}

/// Paths where `a` (helm's) and `b` (the plain manifests') differ, with both values; numbers
/// compare by value (YAML gives 9969 or 9969.0 alike).
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (field, value) in x {
                let path = format!("{path}.{field}");
                match y.get(field) {
                    Some(other) => differences(value, other, &path, out),
                    None => out.push(format!("{path}: only in the chart: {value}")),
                }
            }
            for (field, value) in y {
                if !x.contains_key(field) {
                    out.push(format!("{path}.{field}: missing from the chart: {value}"));
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                differences(p, q, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        (x, y) if x == y => {}
        (x, y) => out.push(format!("{path}: chart {x}, deploy/ {y}")),
    }
}

/// Everything that differs between the chart's objects and the plain ones, object by object.
fn compare(chart: &Objects, plain: &Objects) -> Vec<String> {
    let mut out = Vec::new();
    for (key, object) in chart {
        match plain.get(key) {
            Some(other) => {
                let mut found = Vec::new();
                differences(object, other, "", &mut found);
                out.extend(found.into_iter().map(|d| format!("{key}: {d}")));
            }
            None => out.push(format!("{key}: only in the chart")),
        }
    }
    out.extend(
        plain
            .keys()
            .filter(|key| !chart.contains_key(*key))
            .map(|key| format!("{key}: missing from the chart")),
    );
    out
}

fn yaml_file(path: &str) -> Value {
    let text = fs::read_to_string(workspace().join(path)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A folder of its own for one test, removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = env::temp_dir().join(format!("egress-helm-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The pod spec and the agent container (the one running `run`) of a rendered DaemonSet.
fn pod_and_agent(daemon_set: &Value) -> (&Value, &Value) {
    let pod = &daemon_set["spec"]["template"]["spec"];
    let agent = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["args"][0] == "run")
        .expect("a container running the agent");
    (pod, agent)
}

/// The container's args; each must be a string (the API server refuses numbers there).
fn args(container: &Value) -> Vec<&str> {
    let args = container["args"].as_array().expect("args");
    args.iter()
        .map(|arg| {
            arg.as_str()
                .unwrap_or_else(|| panic!("argument {arg} is not a string"))
        })
        .collect()
}

/// The values following each `flag` in `args` (`--flag value` form, repeatable).
fn flag_values<'a>(args: &[&'a str], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|pair| pair[0] == flag)
        .map(|pair| pair[1])
        .collect()
}

fn env_var<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in the agent's env"))
}

#[test]
fn chart_lints() -> Result<()> {
    let dir = TempDir::new("lint");
    let values = dir.0.join("values.yaml");
    fs::write(&values, OVERRIDES)?;
    for extra in [&[][..], &[OsStr::new("--values"), values.as_os_str()]] {
        let report = output(
            Command::new(helm())
                .args(["lint", CHART, "--namespace", "egress-system"])
                .args(extra),
        )?;
        ensure!(
            !report.contains("[ERROR]") && !report.contains("[WARNING]"),
            "helm lint {extra:?}:\n{report}"
        );
    }
    Ok(())
}

/// The chart cannot include files outside its folder, so it holds a copy of the CRD.
#[test]
fn chart_crd_is_deploy_crd() {
    let root = workspace();
    let plain = fs::read_to_string(root.join("deploy/crd.yaml")).unwrap();
    let copy = fs::read_to_string(root.join(CHART).join("crds/crd.yaml")).unwrap();
    assert!(
        copy == plain,
        "{CHART}/crds/crd.yaml differs from deploy/crd.yaml: copy it again"
    );
}

/// With the default values the chart installs what `kubectl apply -k deploy/` does, so
/// either way of installing gives the same cluster.
#[test]
fn default_values_render_deploy() -> Result<()> {
    let chart = render(PLAIN_NAMESPACE, &["--include-crds"])?;
    assert!(
        !chart.keys().any(|key| key.starts_with("ServiceMonitor ")),
        "the ServiceMonitor is off by default (the kind may not exist)"
    );
    let Some(kubectl) = on_path("kubectl") else {
        eprintln!(
            "SKIPPED: comparing the chart with `kubectl kustomize deploy/`: no kubectl on PATH"
        );
        return Ok(());
    };
    let text = output(Command::new(kubectl).args(["kustomize", "deploy/"]))?;
    let plain = objects(&text, "kubectl kustomize deploy/")?;
    let differences = compare(&chart, &plain);
    ensure!(
        differences.is_empty(),
        "the chart with default values differs from deploy/:\n{}",
        differences.join("\n")
    );
    Ok(())
}

/// The image deploy/'s kustomization sets is the chart's default, so both install the same
/// release of the agent.
#[test]
fn kustomization_image_is_the_charts_default() -> Result<()> {
    let kustomization = yaml_file("deploy/kustomization.yaml");
    let images = kustomization["images"].as_array().expect("images");
    let [image] = images.as_slice() else {
        bail!("deploy/kustomization.yaml: expected one image, found {images:?}");
    };
    let name = image["newName"].as_str().or(image["name"].as_str());
    let plain = format!(
        "{}:{}",
        name.expect("images[0].name"),
        image["newTag"].as_str().expect("images[0].newTag")
    );

    let chart = yaml_file(&format!("{CHART}/Chart.yaml"));
    let values = yaml_file(&format!("{CHART}/values.yaml"));
    let tag = values["image"]["tag"]
        .as_str()
        .filter(|tag| !tag.is_empty())
        .or(chart["appVersion"].as_str())
        .expect("image.tag or appVersion");
    let default = format!("{}:{tag}", values["image"]["repository"].as_str().unwrap());
    ensure!(
        default == plain,
        "the chart's default image is {default}, deploy/kustomization.yaml sets {plain}"
    );

    let rendered = render(PLAIN_NAMESPACE, &[])?;
    let pod = &object(&rendered, "DaemonSet", RELEASE)["spec"]["template"]["spec"];
    for container in ["initContainers", "containers"]
        .iter()
        .flat_map(|list| pod[list].as_array().unwrap())
    {
        ensure!(
            container["image"] == default.as_str(),
            "{} runs {}, not {default}",
            container["name"],
            container["image"]
        );
    }
    Ok(())
}

/// A user's values file: every setting changed. Numbers are YAML numbers, as users write
/// them (Helm reads them as floats).
const OVERRIDES: &str = r#"
image:
  repository: registry.example/egress-gateway-agent
  tag: "0.2.0-rc.1"
  pullPolicy: Always
logLevel: info,egress_agent=debug
clusterCIDRs: [10.244.0.0/16, 10.245.0.0/16]
serviceCIDRs: [10.96.0.0/12]
mapSizes:
  nat: 1048576
  flow: 524288
  node: 32768
  cluster: 1048576
  localPod: 8192
  egressIP: 2048
  policy: 65536
extraArgs: [--nat-port-range, 20000-32767]
metrics:
  port: 9970
  serviceMonitor:
    enabled: true
    labels:
      release: prometheus
    interval: 15s
tolerations:
- key: egress-gateway
  operator: Equal
  value: "true"
  effect: NoSchedule
nodeSelector:
  egress.example/pool: gateways
resources:
  requests:
    cpu: 100m
    memory: 384Mi
updateStrategy:
  maxUnavailable: 1
"#;

#[test]
fn values_reach_the_daemon_set() -> Result<()> {
    let dir = TempDir::new("values");
    let values = dir.0.join("values.yaml");
    fs::write(&values, OVERRIDES)?;
    let rendered = render("egress-system", &["--values", values.to_str().unwrap()])?;
    let ds = object(&rendered, "DaemonSet", RELEASE);
    assert_eq!(ds["metadata"]["namespace"], "egress-system");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    let (pod, agent) = pod_and_agent(ds);

    for container in pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_array().unwrap())
    {
        let name = &container["name"];
        assert_eq!(
            container["image"], "registry.example/egress-gateway-agent:0.2.0-rc.1",
            "{name}"
        );
        assert_eq!(container["imagePullPolicy"], "Always", "{name}");
    }

    let args = args(agent);
    let expected: &[(&str, &[&str])] = &[
        ("--metrics-address", &["$(NODE_IP):9970"]),
        ("--cluster-cidr", &["10.244.0.0/16", "10.245.0.0/16"]),
        ("--service-cidr", &["10.96.0.0/12"]),
        // Written out in full: a float would print as 1.048576e+06, which the agent refuses.
        ("--nat-map-size", &["1048576"]),
        ("--flow-map-size", &["524288"]),
        ("--node-map-size", &["32768"]),
        ("--cluster-map-size", &["1048576"]),
        ("--local-pod-map-size", &["8192"]),
        ("--egress-ip-map-size", &["2048"]),
        ("--policy-map-size", &["65536"]),
        ("--nat-port-range", &["20000-32767"]),
    ];
    for (flag, values) in expected {
        assert_eq!(&flag_values(&args, flag), values, "{flag} in {args:?}");
    }

    assert_eq!(agent["ports"][0]["containerPort"], 9970);
    assert_eq!(agent["readinessProbe"]["httpGet"]["port"], 9970);
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"], 9970);
    assert_eq!(
        env_var(agent, "RUST_LOG")["value"],
        "info,egress_agent=debug"
    );
    assert_eq!(agent["resources"]["requests"]["memory"], "384Mi");

    assert_eq!(
        pod["tolerations"],
        json!([{"key": "egress-gateway", "operator": "Equal", "value": "true",
                "effect": "NoSchedule"}]),
        "a tolerations list replaces the default"
    );
    assert_eq!(
        pod["nodeSelector"],
        json!({"kubernetes.io/os": "linux", "egress.example/pool": "gateways"}),
        "nodeSelector keys add to the default"
    );
    Ok(())
}

/// In another namespace, every namespaced object follows, and the RBAC binds the agent's
/// ServiceAccount there; only the policies' Events stay in `default`.
#[test]
fn namespace_and_metrics_port_reach_every_object() -> Result<()> {
    let dir = TempDir::new("namespace");
    let values = dir.0.join("values.yaml");
    fs::write(&values, OVERRIDES)?;
    let rendered = render("egress-system", &["--values", values.to_str().unwrap()])?;

    let everything = serde_json::to_string(&rendered)?;
    assert!(
        !everything.contains(PLAIN_NAMESPACE),
        "{PLAIN_NAMESPACE} left in a release for egress-system"
    );
    for (key, object) in &rendered {
        let namespace = object["metadata"]["namespace"].as_str();
        let expected = match object["kind"].as_str().unwrap() {
            "ClusterRole" | "ClusterRoleBinding" => None,
            _ if object["metadata"]["name"] == "egress-gateway-agent-events" => Some("default"),
            _ => Some("egress-system"),
        };
        assert_eq!(namespace, expected, "{key}");
        for subject in object["subjects"].as_array().into_iter().flatten() {
            assert_eq!(
                subject,
                &json!({"kind": "ServiceAccount", "name": RELEASE, "namespace": "egress-system"}),
                "{key}: binds the agent's ServiceAccount"
            );
        }
    }
    for kind in [
        "ServiceAccount",
        "ClusterRoleBinding",
        "RoleBinding",
        "Role",
    ] {
        assert!(
            rendered
                .keys()
                .any(|key| key.starts_with(&format!("{kind} "))),
            "no {kind} rendered"
        );
    }
    assert_eq!(
        object(&rendered, "Role", RELEASE)["rules"][0]["resources"],
        json!(["leases"]),
        "the Lease Role is the one in the agents' namespace"
    );

    let service = object(&rendered, "Service", RELEASE);
    assert_eq!(service["spec"]["ports"][0]["port"], 9970);
    let monitor = object(&rendered, "ServiceMonitor", RELEASE);
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"],
        json!(["egress-system"])
    );
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"],
        "the ServiceMonitor selects the Service"
    );
    Ok(())
}

/// Enabled in deploy/'s namespace, the ServiceMonitor is deploy/monitoring's.
#[test]
fn service_monitor_is_deploy_monitoring() -> Result<()> {
    let rendered = render(
        PLAIN_NAMESPACE,
        &["--set", "metrics.serviceMonitor.enabled=true"],
    )?;
    let plain = objects(
        &fs::read_to_string(workspace().join("deploy/monitoring/servicemonitor.yaml"))?,
        "deploy/monitoring/servicemonitor.yaml",
    )?;
    let chart: Objects = rendered
        .into_iter()
        .filter(|(key, _)| key.starts_with("ServiceMonitor "))
        .collect();
    let differences = compare(&chart, &plain);
    ensure!(
        differences.is_empty(),
        "the chart's ServiceMonitor differs from deploy/monitoring/servicemonitor.yaml:\n{}",
        differences.join("\n")
    );
    Ok(())
}

/// The `--*-map-size` flags of `egress-agent run` and their defaults, from its help.
fn agent_map_size_defaults() -> Result<BTreeMap<String, String>> {
    let agent = egress_tests::binaries::require("egress-agent")?;
    let help = output(Command::new(agent).args(["run", "--help"]))?;
    let mut defaults = BTreeMap::new();
    let mut lines = help.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some((flag, _)) = line.split_once(' ') else {
            continue;
        };
        if flag.starts_with("--") && flag.ends_with("-map-size") {
            // The flag's text runs to the next flag (clap's long layout puts the default on
            // a line of its own).
            let description: Vec<&str> = lines
                .clone()
                .take_while(|line| !line.starts_with('-'))
                .collect();
            let description = description.join(" ").trim_end().to_owned();
            let default = description
                .rsplit_once("[default: ")
                .and_then(|(_, rest)| rest.strip_suffix(']'))
                .with_context(|| format!("{flag} has no default in `egress-agent run --help`"))?;
            defaults.insert(flag.to_owned(), default.to_owned());
        }
    }
    ensure!(!defaults.is_empty(), "no --*-map-size in:\n{help}");
    Ok(defaults)
}

/// The keys under `mapSizes:` in values.yaml with the comment above each.
fn map_size_values() -> Vec<(String, String)> {
    let text = fs::read_to_string(workspace().join(CHART).join("values.yaml")).unwrap();
    let mut keys = Vec::new();
    let mut comment = String::new();
    let section = text
        .lines()
        .skip_while(|line| *line != "mapSizes:")
        .skip(1)
        .take_while(|line| line.starts_with("  "));
    for line in section {
        let line = line.trim();
        if let Some(text) = line.strip_prefix('#') {
            comment.push_str(text);
        } else if let Some((key, _)) = line.split_once(':') {
            keys.push((key.to_owned(), std::mem::take(&mut comment)));
        }
    }
    keys
}

/// Every BPF map size the agent has is a value of the chart, documented with the agent's
/// default, and setting it passes that flag.
#[test]
fn every_agent_map_size_is_a_documented_value() -> Result<()> {
    let defaults = agent_map_size_defaults()?;
    let keys = map_size_values();
    let mut documented = BTreeMap::new();
    let mut set = Vec::new();
    for (i, (key, comment)) in keys.iter().enumerate() {
        let flag = comment
            .split_whitespace()
            .map(|word| word.trim_end_matches([',', ':', '.']))
            .find(|word| word.starts_with("--") && word.ends_with("-map-size"))
            .with_context(|| format!("values.yaml: mapSizes.{key}'s comment names no flag"))?;
        let default = defaults
            .get(flag)
            .with_context(|| format!("values.yaml: mapSizes.{key}: the agent has no {flag}"))?;
        ensure!(
            comment.contains(&format!("Default {default}.")),
            "values.yaml: mapSizes.{key} does not say {flag}'s default is {default}: {comment}"
        );
        documented.insert(flag.to_owned(), (key.clone(), 1000 + i));
        set.push(format!("mapSizes.{key}={}", 1000 + i));
    }
    let missing: Vec<&String> = defaults
        .keys()
        .filter(|flag| !documented.contains_key(*flag))
        .collect();
    ensure!(missing.is_empty(), "no mapSizes value for {missing:?}");

    let rendered = render(PLAIN_NAMESPACE, &["--set", &set.join(",")])?;
    let (_, agent) = pod_and_agent(object(&rendered, "DaemonSet", RELEASE));
    let args = args(agent);
    for (flag, (key, value)) in &documented {
        ensure!(
            flag_values(&args, flag) == [value.to_string()],
            "mapSizes.{key}={value} should pass {flag} {value}: {args:?}"
        );
    }
    Ok(())
}
