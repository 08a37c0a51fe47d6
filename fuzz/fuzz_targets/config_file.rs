//! Whole configuration files, as an operator or a researcher writes them: the coordinator's
//! `coordinator.toml` (then the engine configuration it makes), the simulator's config (then
//! its checks and engine configuration) and the device's `edge.toml`. Never a panic, whatever
//! the values (NaN, infinities, huge counts, absurd paths).
#![no_main]

use fedge_core::config_file::parse_toml;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = parse_toml::<fedge_coordinator::config::ServeConfig>(text) {
        let _ = c.engine();
    }
    if let Ok(c) = fedge_sim::SimConfig::from_toml(text)
        && c.validate().is_ok()
    {
        let _ = c.engine_config();
    }
    let _ = parse_toml::<fedge_edge::config::EdgeConfig>(text);
});
