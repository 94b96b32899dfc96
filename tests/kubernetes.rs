//! The Kubernetes manifests (deploy/kubernetes, docs/kubernetes.md):
//! validated against the OpenAPI schema of current Kubernetes versions by
//! PyPI's kubernetes-validate (installed on first use into a venv under
//! target/), strictly, so an unknown field fails too; and checked against
//! what the daemon and the docs say (flags it accepts, the downward-API
//! environment, the mounts its flags point into, the uninstall's patch).
//! There is no API server here: nothing is applied to a cluster.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const KMESH: &str = env!("CARGO_BIN_EXE_kmesh");
const VALIDATOR: &str = "kubernetes-validate==1.37.0";
/// The newest schema the validator ships, and an older still-supported one.
const VERSIONS: [&str; 2] = ["1.37.0", "1.31.0"];
const FILES: [&str; 4] = [
    "namespace.yaml",
    "serviceaccount.yaml",
    "rbac.yaml",
    "daemonset.yaml",
];

fn manifests() -> PathBuf {
    Path::new(REPO).join("deploy/kubernetes")
}

/// The venv's bin directory, made (python3 -m venv, pip install) once.
fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(VALIDATOR.replace("==", "-"));
        let bin = dir.join("bin");
        if !bin.join("kubernetes-validate").exists() {
            let _ = fs::remove_dir_all(&dir);
            for cmd in [
                vec!["python3", "-m", "venv", dir.to_str().unwrap()],
                vec![
                    bin.join("pip").to_str().unwrap(),
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    VALIDATOR,
                ],
            ] {
                let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
                assert!(
                    out.status.success(),
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        bin
    })
}

/// kubernetes-validate --strict on `files` for `version`: (passed, output).
fn validate(version: &str, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(venv().join("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The documents of a YAML file as JSON (PyYAML from the same venv).
fn documents(file: &Path) -> Vec<Value> {
    let script = "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))";
    let out = Command::new(venv().join("python"))
        .args(["-c", script])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        v => panic!("{v}"),
    }
}

fn daemonset() -> Value {
    documents(&manifests().join("daemonset.yaml")).remove(0)
}

#[test]
fn manifests_pass_the_kubernetes_openapi_schema_strictly() {
    let files: Vec<PathBuf> = FILES.iter().map(|f| manifests().join(f)).collect();
    for version in VERSIONS {
        let (ok, out) = validate(version, &files);
        assert!(ok, "Kubernetes {version}:\n{out}");
        // Every resource was checked against a schema (none skipped for
        // want of one, which the validator only warns about).
        let short = &version[..version.rfind('.').unwrap()];
        assert_eq!(out.matches("passed for resource").count(), 5, "{out}");
        assert!(out.contains(&format!("against version {short}")), "{out}");
        assert!(!out.contains("WARN"), "{out}");
    }
}

/// The validator is not a rubber stamp: the DaemonSet with one field
/// misspelled, and with a wrong type, fails, naming what is wrong.
#[test]
fn the_validator_refuses_a_misspelled_field_and_a_wrong_type() {
    let text = fs::read_to_string(manifests().join("daemonset.yaml")).unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("k8s-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    for (from, to, says) in [
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFileSystem: true",
            "readOnlyRootFileSystem",
        ),
        ("maxSurge: 1", "maxSurge: [1]", "maxSurge"),
    ] {
        assert!(text.contains(from), "{from}");
        let bad = dir.join("daemonset.yaml");
        fs::write(&bad, text.replace(from, to)).unwrap();
        let (ok, out) = validate(VERSIONS[0], &[bad]);
        assert!(!ok, "{to} passed:\n{out}");
        assert!(out.contains(says), "{out}");
    }
    fs::remove_dir_all(&dir).unwrap();
}

/// The kustomization applies every manifest and names the DaemonSet's
/// image, at this version.
#[test]
fn kustomization_lists_every_manifest_and_the_image() {
    let k = &documents(&manifests().join("kustomization.yaml"))[0];
    let mut listed: Vec<&str> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    listed.sort();
    let mut present: Vec<String> = fs::read_dir(manifests())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    assert_eq!(listed, present);
    let image = daemonset()["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_string();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(image, format!("localhost/kmesh:{version}"));
    assert_eq!(k["images"][0]["name"], "localhost/kmesh");
    assert_eq!(k["images"][0]["newTag"], version);
}

/// The DaemonSet as the daemon and docs/kubernetes.md need it.
#[test]
fn daemonset_flags_env_and_mounts_fit_the_daemon() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();

    // Every flag is one `kmesh daemon` has.
    let help = Command::new(KMESH)
        .args(["daemon", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for a in &args {
        let flag = a.split('=').next().unwrap();
        let known = help.lines().map(str::trim_start).any(|l| {
            l.strip_prefix(flag)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        });
        assert!(known, "{flag} is no daemon flag");
    }
    // docs/kubernetes.md's uninstall removes them by these indexes.
    assert_eq!(args[6], "--keep-attached");
    assert_eq!(args[7], "--cni-keep-config");
    let docs = fs::read_to_string(Path::new(REPO).join("docs/kubernetes.md")).unwrap();
    assert!(
        docs.contains("/spec/template/spec/containers/0/args/6"),
        "docs/kubernetes.md's uninstall patch"
    );

    let env: Vec<(&str, &str)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let path = e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?;
            Some((e["name"].as_str().unwrap(), path))
        })
        .collect();
    for want in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IP", "status.podIP"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        assert!(env.contains(&want), "{want:?} not in {env:?}");
    }

    // Each file or directory a flag names lies in a mount of the right
    // volume.
    let mounts = c["volumeMounts"].as_array().unwrap();
    let volumes = pod["volumes"].as_array().unwrap();
    let volume_of = |path: &str| -> &Value {
        let m = mounts
            .iter()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("{path} is in no mount"));
        volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume {}", m["name"]))
    };
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let token = volume_of(flag("--xds-token-file"));
    let src = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(src["audience"], "istio-ca");
    assert!(flag("--xds-token-file").ends_with(src["path"].as_str().unwrap()));
    assert_eq!(
        volume_of(flag("--xds-ca-file"))["configMap"]["name"],
        "istio-ca-root-cert"
    );
    assert!(flag("--xds-ca-file").ends_with("/root-cert.pem"));
    assert_eq!(
        flag("--xds-address"),
        "https://istiod.istio-system.svc:15012"
    );
    for (f, host) in [
        ("--cgroup", "/sys/fs/cgroup"),
        ("--bpffs", "/sys/fs/bpf"),
        ("--admin-socket", "/run/kmesh"),
        ("--cni-state-file", "/run/kmesh"),
        ("--cni-conf-dir", "/etc/cni/net.d"),
        ("--cni-bin-dir", "/opt/cni/bin"),
    ] {
        assert_eq!(volume_of(flag(f))["hostPath"]["path"], host, "{f}");
    }
    // The kubeconfig the plugin is given is a node path; the daemon writes
    // it into the conf dir, whose node path it must be in.
    let kc = Path::new(flag("--cni-kubeconfig"));
    let conf = volume_of(flag("--cni-conf-dir"))["hostPath"]["path"]
        .as_str()
        .unwrap();
    assert_eq!(kc.parent().unwrap(), Path::new(conf));
    // `kmesh ctl` in the container uses the default socket.
    assert_eq!(flag("--admin-socket"), "/run/kmesh/admin.sock");
    // Readiness, metrics and their annotations use the ports the daemon
    // listens on by default (the manifest sets no --*-addr flag).
    for (f, default) in [
        ("--readiness-addr", "0.0.0.0:15021"),
        ("--metrics-addr", "0.0.0.0:15020"),
    ] {
        assert!(!args.iter().any(|a| a.starts_with(f)), "{f} in the args");
        let line = help.lines().skip_while(|l| !l.contains(f)).take(6);
        let text: String = line.collect();
        assert!(
            text.contains(&format!("[default: {default}]")),
            "{f}: {text}"
        );
    }
    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!(
        (&probe["path"], &probe["port"]),
        (
            &serde_json::json!("/healthz/ready"),
            &serde_json::json!(15021)
        )
    );
    let ports: Vec<i64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [15020, 15021]);
    let ann = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "15020");
    assert_eq!(ann["prometheus.io/path"], "/stats/prometheus");

    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let ru = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        (ru["maxSurge"].as_i64(), ru["maxUnavailable"].as_i64()),
        (Some(1), Some(0))
    );
}

/// RBAC: read pods and namespaces, nothing else.
#[test]
fn rbac_only_reads_pods_and_namespaces() {
    let docs = documents(&manifests().join("rbac.yaml"));
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    assert_eq!(
        role["rules"],
        serde_json::json!([{
            "apiGroups": [""],
            "resources": ["pods", "namespaces"],
            "verbs": ["get", "list", "watch"]
        }])
    );
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .unwrap();
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], "kmesh");
    assert_eq!(binding["subjects"][0]["namespace"], "kmesh-system");
}
