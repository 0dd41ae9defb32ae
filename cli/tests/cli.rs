//! The `pagemig` command line, run as a user would.

use std::process::Command;

fn pagemig(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pagemig")).args(args).output().expect("run pagemig")
}

fn node() -> String {
    pagemig::numa::memory_nodes().unwrap()[0].to_string()
}

#[test]
fn move_json_reports_a_verified_migration() {
    for folio in ["4KiB", "64KiB", "2MiB"] {
        let out = pagemig(&[
            "move",
            "--size",
            "16MiB",
            "--folio-size",
            folio,
            "--to-node",
            &node(),
            "--writers",
            "2",
            "--json",
        ]);
        assert!(out.status.success(), "{folio}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in [
            "bytes",
            "folio_size",
            "folios",
            "to_node",
            "succeeded_folios",
            "failed_folios",
            "mismatched_bytes",
            "writes",
            "lost_writes",
            "placement_ok",
            "gbps",
            "critical_path_gbps",
            "memcpy_gbps",
            "uffdio_copy_gbps",
            "ratio",
            "critical_path_ratio",
            "page_errors",
            "first_folio_us",
            "phases_us",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        let folio_size = pagemig::folio::order_of(v["folio_size"].as_u64().unwrap() as usize).map(|o| 4096usize << o);
        assert_eq!(v["bytes"], 16 << 20);
        assert_eq!(v["folios"].as_u64().unwrap() as usize, (16 << 20) / folio_size.unwrap());
        assert_eq!(v["succeeded_folios"], v["folios"]);
        assert_eq!(v["failed_folios"], 0);
        assert_eq!(v["mismatched_bytes"], 0);
        assert_eq!(v["lost_writes"], 0);
        assert_eq!(v["placement_ok"], true);
        assert!(v["writes"].as_u64().unwrap() > 0);
        assert!(v["gbps"].as_f64().unwrap() > 0.0 && v["memcpy_gbps"].as_f64().unwrap() > 0.0);
        assert!(v["uffdio_copy_gbps"].as_f64().unwrap() > 0.0);
        // The headline is the whole call: never faster than its critical path.
        assert!(v["gbps"].as_f64().unwrap() <= v["critical_path_gbps"].as_f64().unwrap());
        let total_s = v["phases_us"]["total"].as_f64().unwrap() / 1e6;
        let end_to_end = (16 << 20) as f64 / total_s / 1e9;
        assert!((v["gbps"].as_f64().unwrap() - end_to_end).abs() <= end_to_end * 1e-6, "{v}");
        assert_eq!(v["migrator"], "cpu");
        assert_eq!(v["page_errors"], serde_json::json!({}));
        for phase in ["prepare", "unmap", "copy", "move"] {
            assert!(v["phases_us"][phase].as_f64().is_some(), "phase {phase}");
        }
    }
}

#[test]
fn move_table_and_topology_print() {
    let out = pagemig(&["move", "--size", "4MiB", "--folio-size", "4KiB", "--to-node", &node()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("end to end / memcpy") && text.contains("placement"), "{text}");
    assert!(text.contains("critical path (excl. destination preparation)") && text.contains("UFFDIO_COPY"), "{text}");
    // The headline comes before the narrower figure.
    assert!(text.find("throughput (end to end)") < text.find("critical path (excl."), "{text}");
    let out = pagemig(&["topology", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!v["nodes"].as_array().unwrap().is_empty());
    assert_eq!(v["userfaultfd"]["available"], true);
}

#[test]
fn bad_arguments_get_clear_errors() {
    let n = node();
    for (args, needle) in [
        (vec!["--size", "1000"], "not a multiple"),
        (vec!["--size", "0"], "zero"),
        (vec!["--size", "4MiB", "--folio-size", "3KiB"], "power of two"),
        (vec!["--size", "4MiB", "--to-node=4000"], "not an online node"),
        (vec!["--size", "4MiB", "--batch-pages", "0"], "max_batch_pages"),
        (vec!["--size", "4MiB", "--batch-pages", "262145"], "max_batch_pages"),
        (vec!["--size", "4MiB", "--reason", "bogus"], "accepted"),
        (vec!["--size", "4XB"], "unknown unit"),
    ] {
        let mut full = vec!["move"];
        full.extend(args.iter().copied());
        if !args.iter().any(|a| a.starts_with("--to-node")) {
            full.extend(["--to-node", &n]);
        }
        let out = pagemig(&full);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn kernel_migrator_refuses_a_move_within_one_node() {
    let n = node();
    let out = pagemig(&["move", "--migrator", "kernel", "--size", "4MiB", "--from-node", &n, "--to-node", &n]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("move_pages(2) to the node a page is already on copies nothing"), "{err}");
    let out = pagemig(&["move", "--migrator", "kernel", "--size", "4MiB", "--to-node", &n, "--channels", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the kernel's"));
}

#[test]
fn kernel_migrator_moves_between_two_nodes_where_there_are_two() {
    let nodes = pagemig::numa::memory_nodes().unwrap();
    let [from, to, ..] = nodes[..] else { return };
    let (from, to) = (from.to_string(), to.to_string());
    let out = pagemig(&[
        "move",
        "--migrator",
        "kernel",
        "--size",
        "8MiB",
        "--folio-size",
        "4KiB",
        "--from-node",
        &from,
        "--to-node",
        &to,
        "--writers",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["migrator"], "kernel");
    assert_eq!((v["placement_ok"].clone(), v["mismatched_bytes"].clone()), (true.into(), 0.into()));
    assert_eq!(v["page_errors"], serde_json::json!({}));
    assert!(v["critical_path_gbps"].is_null() && v["gbps"].as_f64().unwrap() > 0.0);
}

#[test]
fn move_with_a_prepared_reserve_takes_its_destinations_from_it() {
    let n = node();
    for (folio, extra) in [("4KiB", None), ("2MiB", None), ("4KiB", Some("--attr=migrate/fill_empty=0"))] {
        let mut args = vec!["move", "--size", "16MiB", "--folio-size", folio, "--to-node", &n];
        args.extend(["--writers", "2", "--reserve", "--json"]);
        args.extend(extra);
        let out = pagemig(&args);
        assert!(out.status.success(), "{folio}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["failed_folios"], 0, "{v}");
        assert_eq!(v["mismatched_bytes"], 0, "{v}");
        assert_eq!(v["lost_writes"], 0, "{v}");
        assert_eq!(v["placement_ok"], true, "{v}");
        assert_eq!(v["reserve_bytes"], 16 << 20, "{v}");
        // Everything was prepared before the call: the call prepared nothing itself.
        assert_eq!(v["stats"]["prepare_ns"], 0, "{folio}: {v}");
        assert_eq!(v["stats"]["copied_in_folios"], 0, "{folio}: {v}");
        assert!(v["copy_kernels"]["hot"].is_string(), "{v}");
    }
    // A size: that much is prepared.
    let out = pagemig(&["move", "--size", "8MiB", "--folio-size", "2MiB", "--to-node", &n, "--reserve=4MiB", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reserve_bytes"], 4 << 20, "{v}");
    assert_eq!(v["placement_ok"], true, "{v}");
    let out = pagemig(&["move", "--size", "8MiB", "--to-node", &n, "--reserve=lots"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lots"), "{}", String::from_utf8_lossy(&out.stderr));
}
