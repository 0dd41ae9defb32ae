//! The config file and `PAGEMIG_ATTRS` applied once per process, when its engine opens: a
//! fresh process (this test binary run again with the environment set) sees the file's
//! values, `PAGEMIG_ATTRS` over them, and its rejected entries reported; a child it forks
//! takes its engine's settings and does not read the file again.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use pagemig::Engine;
use pagemig::attr::{self, Source};

/// Set in the process this test starts, which checks what its engine applied.
const CHILD: &str = "PAGEMIG_CONFIG_TEST_CHILD";

#[test]
fn settings_apply_once_when_the_engine_opens() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "settings_apply_once_when_the_engine_opens");
    if std::env::var_os(CHILD).is_some() {
        return in_fresh_process();
    }
    let dir = std::env::temp_dir().join(format!("pagemig-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("attrs");
    std::fs::write(&file, "# test\nmigrate/max_batch_pages = 1024\ndcbm/nr_dma_chan = 2\nmigrate/pipelined = maybe\n")
        .unwrap();
    common::in_fresh_process(
        "settings_apply_once_when_the_engine_opens",
        &[
            (CHILD, "1".as_ref()),
            ("PAGEMIG_CONFIG", file.as_os_str()),
            ("PAGEMIG_ATTRS", "dcbm/nr_dma_chan=3".as_ref()),
        ],
        Duration::from_secs(120),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What the process started by the test checks.
fn in_fresh_process() {
    let file = PathBuf::from(std::env::var_os("PAGEMIG_CONFIG").unwrap());
    let line = |line| Source::File { path: file.clone(), line };
    let opened = Engine::global();
    let loaded = attr::loaded();
    assert_eq!(loaded.file.as_deref(), Some(file.as_path()));
    // The migrators' settings apply with or without an engine; PAGEMIG_ATTRS wins.
    assert_eq!(attr::read("dcbm/nr_dma_chan").unwrap(), "3");
    assert_eq!(attr::source("dcbm/nr_dma_chan").unwrap(), Source::Env);
    let applied: Vec<(&str, &str, &Source)> =
        loaded.applied.iter().map(|s| (s.path, s.value.as_str(), &s.source)).collect();
    assert!(applied.contains(&("dcbm/nr_dma_chan", "2", &line(3))), "{applied:?}");
    assert!(applied.contains(&("dcbm/nr_dma_chan", "3", &Source::Env)), "{applied:?}");
    assert!(loaded.rejected.iter().any(|r| r.source == line(4) && r.error.to_string().contains("0 or 1")));
    assert_eq!(attr::source("mtcopy/threads").unwrap(), Source::Default);
    let Ok(engine) = opened else {
        // Without userfaultfd the engine's settings are rejected, saying why.
        assert!(loaded.rejected.iter().any(|r| r.source == line(2) && r.error.to_string().contains("engine")));
        return;
    };
    assert_eq!(loaded.rejected.len(), 1, "{:?}", loaded.rejected);
    assert_eq!(engine.settings().max_batch_pages, 1024);
    assert_eq!(attr::source("migrate/max_batch_pages").unwrap(), line(2));
    assert!(engine.settings().pipelined, "a rejected entry changed the attribute");
    attr::write("migrate/max_batch_pages", "2048").unwrap();
    assert_eq!(attr::source("migrate/max_batch_pages").unwrap(), Source::Process);
    // A child takes the parent engine's settings, not the file's (changed meanwhile).
    std::fs::write(&file, "migrate/max_batch_pages = 7\ndcbm/nr_dma_chan = 9\n").unwrap();
    let parent_engine = engine as *const Engine as usize;
    let parent_loaded = loaded as *const attr::Loaded as usize;
    // SAFETY: the child opens its own engine and reads attributes on this thread.
    let code = unsafe {
        common::fork_and_wait(Duration::from_secs(60), || {
            let Ok(engine) = Engine::global() else { return 2 };
            if engine as *const Engine as usize == parent_engine {
                return 3;
            }
            if engine.settings().max_batch_pages != 2048 || attr::read("dcbm/nr_dma_chan").ok().as_deref() != Some("3")
            {
                return 4;
            }
            if attr::loaded() as *const attr::Loaded as usize != parent_loaded {
                return 5;
            }
            0
        })
    };
    assert_eq!(
        code, 0,
        "child: 2 no engine, 3 the parent's engine, 4 not the parent's settings, 5 the config read again"
    );
}
