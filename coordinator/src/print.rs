//! What the operator commands print: the coordinator's answers as tables for people or as
//! JSON for scripts. Writers are passed in, so the formats are testable.

use std::io::{self, Write};

use fedge_core::registry::ModelRole;
use fedge_core::wire::{DeviceLine, ModelLine, RoundLine, Status};

/// Closed rounds as JSON (a list of rounds).
pub fn rounds_json(rounds: &[RoundLine]) -> serde_json::Value {
    rounds
        .iter()
        .map(|r| {
            serde_json::json!({
                "round": r.round, "model_version": r.model_version, "selected": r.selected,
                "devices_reporting": r.results, "failures": r.failures, "stragglers": r.stragglers,
                "surplus": r.surplus, "samples": r.samples, "train_loss": r.train_loss, "accuracy": r.accuracy,
                "failed_reason": r.failed_reason, "duration_ms": r.duration_ms,
                "privacy": r.privacy.map(|p| serde_json::json!({
                    "sampling_rate": p.sampling_rate, "noise_multiplier": p.noise_multiplier,
                    "clip_norm": p.clip_norm, "epsilon": p.epsilon,
                })),
            })
        })
        .collect()
}

/// Closed rounds as a table.
pub fn print_rounds(out: &mut impl Write, rounds: &[RoundLine]) -> io::Result<()> {
    writeln!(
        out,
        "{:>5}  {:>7}  {:>9}  {:>7}  {:>5}  {:>8}  {:>10}  {:>9}  {:>8}  {:>8}",
        "round", "version", "reporting", "failed", "late", "samples", "train_loss", "accuracy", "epsilon", "duration"
    )?;
    for r in rounds {
        let acc = r.accuracy.map_or("-".into(), |a| format!("{:.2}%", a * 100.0));
        writeln!(
            out,
            "{:>5}  {:>7}  {:>4}/{:<4}  {:>7}  {:>5}  {:>8}  {:>10.4}  {:>9}  {:>8}  {:>8}{}",
            r.round,
            r.model_version,
            r.results,
            r.selected,
            r.failures,
            r.stragglers,
            r.samples,
            r.train_loss,
            acc,
            r.privacy.map_or("-".into(), |p| format!("{:.4}", p.epsilon)),
            r.duration_ms.map_or("-".into(), |d| format!("{:.1} s", d as f64 / 1000.0)),
            r.failed_reason.as_ref().map_or(String::new(), |w| format!("  not aggregated: {w}"))
        )?;
    }
    Ok(())
}

/// What the coordinator is doing: `training` (a round is open), `waiting for devices` (rounds
/// are wanted but none could start yet) or `idle`.
pub fn phase(s: &Status) -> &'static str {
    if s.open_round.is_some() {
        "training"
    } else if s.rounds_left > 0 {
        "waiting for devices"
    } else {
        "idle"
    }
}

/// The coordinator's status as JSON (what `round status --json` prints and the operator page
/// reads).
pub fn status_json(s: &Status) -> serde_json::Value {
    serde_json::json!({
        "model_version": s.model_version, "model_hash": s.model_hash.to_string(),
        "phase": phase(s), "current_round": s.current_round,
        "open_round": s.open_round.map(|o| serde_json::json!({
            "round": o.round, "selected": o.selected, "wanted": o.wanted, "devices_reporting": o.reporting,
            "deadline_in_ms": o.deadline_in_ms,
        })),
        "rounds_left": s.rounds_left,
        "devices_connected": s.devices_connected, "devices_known": s.devices_known, "rounds": rounds_json(&s.rounds),
        "privacy": s.privacy.map(|p| serde_json::json!({
            "noise_multiplier": p.noise_multiplier, "clip_norm": p.clip_norm, "delta": p.delta,
            "epsilon": p.epsilon, "target_epsilon": p.target_epsilon,
        })),
        "secure": s.secure.as_ref().map(|x| serde_json::json!({
            "round": x.round, "stage": x.stage, "participants": x.participants, "answered": x.answered,
            "deadline_in_ms": x.deadline_in_ms,
        })),
        "upstream": s.upstream.as_ref().map(|u| serde_json::json!({
            "connected": u.connected, "root_round": u.root_round, "root_version": u.root_version,
            "adopted_as": u.adopted_as, "uploaded": u.uploaded,
            "regional_model": u.regional_model.map(|(v, t)| serde_json::json!({"version": v, "threshold": t})),
        })),
    })
}

/// The coordinator's status: a summary line, the privacy budget and the rounds (or JSON).
pub fn print_status(out: &mut impl Write, s: &Status, json: bool) -> io::Result<()> {
    if json {
        return writeln!(out, "{:#}", status_json(s));
    }
    writeln!(
        out,
        "model v{} ({}...)  round {}  rounds left {}  devices {} connected / {} known",
        s.model_version,
        &s.model_hash.to_string()[..12],
        s.current_round.map_or("-".into(), |r| r.to_string()),
        s.rounds_left,
        s.devices_connected.len(),
        s.devices_known
    )?;
    if let Some(o) = s.open_round {
        writeln!(
            out,
            "round {} open: {} of {} wanted reporting ({} selected), deadline in {} s",
            o.round,
            o.reporting,
            o.wanted,
            o.selected,
            o.deadline_in_ms.div_ceil(1000)
        )?;
    }
    if let Some(x) = &s.secure {
        writeln!(
            out,
            "secure aggregation: round {} {}: {} of {} devices answered, closes in {} s",
            x.round,
            match x.stage.as_str() {
                "ready" => "ready phase (devices training)".to_string(),
                "none" => "went without a session (fewer than 2 devices ready)".to_string(),
                stage => format!("stage {stage}"),
            },
            x.answered,
            x.participants,
            x.deadline_in_ms.div_ceil(1000)
        )?;
    }
    if let Some(u) = &s.upstream {
        writeln!(
            out,
            "regional aggregator: root {}; {}{}",
            if u.connected { "connected" } else { "NOT CONNECTED" },
            match (u.root_round, u.root_version, u.adopted_as) {
                (Some(r), Some(v), Some(a)) => format!(
                    "root round {r} on root v{v} (adopted as v{a}), {}",
                    if u.uploaded { "result acknowledged" } else { "in progress" }
                ),
                _ => "no task taken on yet".into(),
            },
            u.regional_model.map_or(String::new(), |(v, t)| format!("; regional model v{v} escalates below {t:.4}"))
        )?;
    }
    if let Some(p) = s.privacy {
        writeln!(
            out,
            "central DP: epsilon {:.4} spent at delta {:e}{}  (z = {}, clip {:.4})",
            p.epsilon,
            p.delta,
            p.target_epsilon.map_or(String::new(), |t| format!(" of a budget of {t}")),
            p.noise_multiplier,
            p.clip_norm
        )?;
    }
    print_rounds(out, &s.rounds)
}

/// Every device ever seen, as JSON (what `devices list --json` prints and the operator page
/// reads).
pub fn devices_json(devices: &[DeviceLine]) -> serde_json::Value {
    devices
        .iter()
        .map(|d| {
            let caps = d.capabilities.as_ref().map(|c| {
                serde_json::json!({"backend": c.backend, "memory_mb": c.memory_mb, "charging": c.charging,
                    "unmetered": c.unmetered, "num_samples": c.num_samples})
            });
            serde_json::json!({"id": d.id, "connected": d.connected, "capabilities": caps, "running": d.running,
                "last_seen": d.last_seen})
        })
        .collect()
}

/// Every device ever seen, as a table (or JSON).
pub fn print_devices(out: &mut impl Write, devices: &[DeviceLine], json: bool) -> io::Result<()> {
    if json {
        return writeln!(out, "{:#}", devices_json(devices));
    }
    writeln!(out, "{:<24} {:>9}  {:>7}  {:>8}  {:>9}", "device", "connected", "backend", "memory", "samples")?;
    for d in devices {
        let (backend, mem, samples) = d.capabilities.as_ref().map_or(("-".into(), "-".into(), "-".into()), |c| {
            (c.backend.clone(), format!("{} MiB", c.memory_mb), c.num_samples.to_string())
        });
        let connected = if d.connected { "yes" } else { "no" };
        writeln!(out, "{:<24} {connected:>9}  {backend:>7}  {mem:>8}  {samples:>9}", d.id)?;
    }
    Ok(())
}

/// One model version as JSON.
pub fn model_json(m: &ModelLine) -> serde_json::Value {
    serde_json::json!({
        "version": m.version, "role": m.role, "architecture": m.architecture, "parent": m.parent,
        "round": m.round, "accuracy": m.accuracy, "epsilon": m.epsilon, "parameters": m.parameters,
        "size_bytes": m.size_bytes, "sha256": m.hash.to_string(), "created_at": m.created_at,
        "signed": m.signed, "promoted": m.promoted, "devices_running": m.devices_running,
    })
}

/// Model versions as JSON (what `models list --json` prints and the operator page reads).
pub fn models_json(models: &[ModelLine]) -> serde_json::Value {
    models.iter().map(model_json).collect()
}

/// One model version in full, a field a line (or JSON).
pub fn print_model(out: &mut impl Write, m: &ModelLine, json: bool) -> io::Result<()> {
    if json {
        return writeln!(out, "{:#}", model_json(m));
    }
    for (k, v) in model_json(m).as_object().expect("an object") {
        writeln!(out, "{k:<16} {v}")?;
    }
    Ok(())
}

/// Model versions, global and student, as a table (or JSON).
pub fn print_models(out: &mut impl Write, models: &[ModelLine], json: bool) -> io::Result<()> {
    if json {
        return writeln!(out, "{:#}", models_json(models));
    }
    writeln!(
        out,
        "{:>7}  {:<7}  {:<4}  {:>6}  {:>5}  {:>8}  {:>8}  {:>10}  {:>8}  {:<12}  {:>7}  deployed",
        "version", "role", "arch", "parent", "round", "accuracy", "epsilon", "bytes", "latency", "sha256", "signed"
    )?;
    for m in models {
        let acc = m.accuracy.map_or("-".into(), |a| format!("{:.2}%", a * 100.0));
        let eps = m.epsilon.map_or("-".into(), |e| format!("{e:.4}"));
        let role = match m.role {
            ModelRole::Global => "global",
            ModelRole::Student => "student",
            ModelRole::Regional => "regional",
        };
        let parent = m.parent.map_or("-".into(), |p| p.to_string());
        let deployed = if m.promoted {
            format!("PROMOTED, {} devices", m.devices_running)
        } else if m.devices_running > 0 {
            format!("{} devices", m.devices_running)
        } else {
            String::new()
        };
        writeln!(
            out,
            "{:>7}  {role:<7}  {:<4}  {parent:>6}  {:>5}  {acc:>8}  {eps:>8}  {:>10}  {:>8}  {:<12}  {:>7}  {deployed}",
            m.version,
            m.architecture,
            m.round,
            m.size_bytes,
            m.latency_us.map_or("-".into(), |l| format!("{l:.1} us")),
            &m.hash.to_string()[..12],
            if m.signed { "yes" } else { "no" },
        )?;
    }
    Ok(())
}
