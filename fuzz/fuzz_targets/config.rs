//! Configuration text: a strategy table (`strategy` and `[strategy_options]`) is parsed and
//! checked without panicking, whatever the values (NaN, infinities, huge counts).
#![no_main]

use fedge_core::config_file::parse_toml;
use fedge_engine::strategy::{StrategyConfig, StrategyOptions};
use libfuzzer_sys::fuzz_target;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    strategy: String,
    #[serde(default)]
    strategy_options: StrategyOptions,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(file) = parse_toml::<File>(text) {
        let _ = StrategyConfig::parse(&file.strategy, &file.strategy_options);
    }
});
