//! Golden tests for the state machine: each `tests/golden/NAME.events.jsonl` holds a config
//! line and timed external events; a small simulator fires the timers the machine armed (in
//! deadline order) and records every step into `NAME.actions.jsonl`. `UPDATE_GOLDEN=1`
//! rewrites the expected files when a behaviour change is intended.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use vrrp::fsm::{Action, Event, Fsm, FsmConfig};

enum Line {
    Config(FsmConfig),
    Step { at: Duration, event: Option<Event> },
}

/// `{"config": {...}}`, `{"at": "1s", "event": "...", ...}`, or `{"at": "5s"}` (advance time
/// only). Parsed by hand so a misspelt event fails instead of becoming a time step.
fn parse_line(raw: &str) -> Result<Line, String> {
    let mut v: serde_json::Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let obj = v.as_object_mut().ok_or("not an object")?;
    if !obj.contains_key("at") {
        let c = obj
            .remove("config")
            .ok_or("neither \"at\" nor \"config\"")?;
        return serde_json::from_value(c)
            .map(Line::Config)
            .map_err(|e| e.to_string());
    }
    let at = obj.remove("at").ok_or("missing \"at\"")?;
    let at = humantime::parse_duration(at.as_str().ok_or("\"at\" must be a string")?)
        .map_err(|e| e.to_string())?;
    if obj.is_empty() {
        return Ok(Line::Step { at, event: None });
    }
    let event = serde_json::from_value(v).map_err(|e| e.to_string())?;
    Ok(Line::Step {
        at,
        event: Some(event),
    })
}

#[derive(Serialize)]
struct Output<'a> {
    at: String,
    #[serde(flatten)]
    event: &'a Event,
    actions: &'a [Action],
    state: &'static str,
    priority: u8,
}

#[derive(Default)]
struct Timers {
    adver: Option<Duration>,
    master_down: Option<Duration>,
    handoff: Option<Duration>,
}

impl Timers {
    fn apply(&mut self, now: Duration, actions: &[Action]) {
        for a in actions {
            match a {
                Action::CancelTimers => *self = Timers::default(),
                Action::ArmAdverTimer { after } => self.adver = Some(now + *after),
                Action::ArmMasterDownTimer { after } => self.master_down = Some(now + *after),
                Action::ArmHandoffTimer { after } => self.handoff = Some(now + *after),
                _ => {}
            }
        }
    }

    /// Earliest timer due at or before `until`; ties go handoff, master-down, adver.
    fn next_due(&mut self, until: Duration) -> Option<(Duration, Event)> {
        let candidates = [
            (self.handoff, Event::HandoffTimerFired),
            (self.master_down, Event::MasterDownTimerFired),
            (self.adver, Event::AdverTimerFired),
        ];
        let (at, ev) = candidates
            .into_iter()
            .filter_map(|(t, e)| t.filter(|t| *t <= until).map(|t| (t, e)))
            .min_by_key(|(t, _)| *t)?;
        match ev {
            Event::HandoffTimerFired => self.handoff = None,
            Event::MasterDownTimerFired => self.master_down = None,
            _ => self.adver = None,
        }
        Some((at, ev))
    }
}

fn run_scenario(events_path: &Path) -> String {
    let text = std::fs::read_to_string(events_path).unwrap();
    let mut fsm: Option<Fsm> = None;
    let mut timers = Timers::default();
    let mut out = String::new();
    let mut stopped = false;
    let record = |fsm: &Fsm, at: Duration, ev: &Event, actions: &[Action], out: &mut String| {
        let line = Output {
            at: humantime::format_duration(at).to_string(),
            event: ev,
            actions,
            state: fsm.state().as_str(),
            priority: fsm.effective_priority(),
        };
        out.push_str(&serde_json::to_string(&line).unwrap());
        out.push('\n');
    };
    for (n, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() || raw.trim_start().starts_with("//") {
            continue;
        }
        let line =
            parse_line(raw).unwrap_or_else(|e| panic!("{}:{}: {e}", events_path.display(), n + 1));
        match line {
            Line::Config(config) => fsm = Some(Fsm::new(config)),
            Line::Step { at, event } => {
                let fsm = fsm.as_mut().expect("config line first");
                while !stopped {
                    let Some((t, ev)) = timers.next_due(at) else {
                        break;
                    };
                    let actions = fsm.handle(ev.clone(), t);
                    timers.apply(t, &actions);
                    stopped |= actions.contains(&Action::Stopped);
                    record(fsm, t, &ev, &actions, &mut out);
                }
                if let Some(ev) = event {
                    let actions = fsm.handle(ev.clone(), at);
                    timers.apply(at, &actions);
                    stopped |= actions.contains(&Action::Stopped);
                    record(fsm, at, &ev, &actions, &mut out);
                }
            }
        }
    }
    out
}

#[test]
fn golden_scenarios() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut scenarios: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".events.jsonl"))
        .collect();
    scenarios.sort();
    assert!(
        scenarios.len() >= 10,
        "golden scenarios missing in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for events in scenarios {
        let got = run_scenario(&events);
        let expected_path = PathBuf::from(
            events
                .to_string_lossy()
                .replace(".events.jsonl", ".actions.jsonl"),
        );
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != want {
            failures.push(format!(
                "{}: actions differ (UPDATE_GOLDEN=1 rewrites after review)\n--- want\n{want}--- got\n{got}",
                expected_path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
