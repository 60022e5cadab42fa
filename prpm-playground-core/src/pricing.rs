//! Token pricing: pure functions, no I/O (apart from [`PriceTable::load`], which reads a file).
//!
//! * 1 credit = [`TOKENS_PER_CREDIT`] tokens (input + output, cache tokens count as input),
//!   rounded up, at least 1 credit per run, times the model's credit multiplier.
//! * USD cost from the price table, exact in [`Decimal`] and rounded *up* to whole micro-dollars
//!   (`cost_micros`), so a run never costs less than the provider charges.

use std::collections::BTreeMap;
use std::path::Path;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Tokens per credit.
pub const TOKENS_PER_CREDIT: u64 = 5_000;
/// Default cap on the input of one request (system prompt + history + input), in tokens.
pub const DEFAULT_REQUEST_CAP_TOKENS: u64 = 20_000;
/// Upper bound on any token count the library accepts (guards the arithmetic).
pub const MAX_TOKENS: u64 = 100_000_000;
const MAX_MODELS: usize = 10_000;
const MAX_RATE_USD_PER_MTOK: Decimal = Decimal::from_parts(10_000, 0, 0, false, 0);

/// The built-in price table (see `data/prices.toml`).
pub const DEFAULT_PRICES_TOML: &str = include_str!("../data/prices.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Anthropic,
    Openai,
    OpenaiCompatible,
}

/// One model's prices, in USD per million tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub id: String,
    pub provider: Provider,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(rename = "input")]
    pub input_usd_per_mtok: Decimal,
    #[serde(rename = "output")]
    pub output_usd_per_mtok: Decimal,
    #[serde(rename = "cache_read")]
    pub cache_read_usd_per_mtok: Decimal,
    #[serde(rename = "cache_write")]
    pub cache_write_usd_per_mtok: Decimal,
    /// Credit multiplier (Sonnet-class 1, Opus-class 5).
    pub multiplier: u32,
    /// The largest `max_tokens` a request to this model may ask for.
    pub max_output_tokens: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    model: Vec<ModelPrice>,
}

/// The price table: models by id and by alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    models: BTreeMap<String, ModelPrice>,
    aliases: BTreeMap<String, String>,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable::from_toml_str(DEFAULT_PRICES_TOML).expect("built-in price table is valid")
    }
}

impl PriceTable {
    /// Builds a table from models, validating every entry.
    pub fn new(models: Vec<ModelPrice>) -> Result<Self> {
        if models.is_empty() {
            return Err(Error::PriceTable("the table has no models".into()));
        }
        if models.len() > MAX_MODELS {
            return Err(Error::PriceTable(format!("more than {MAX_MODELS} models")));
        }
        let mut table = PriceTable { models: BTreeMap::new(), aliases: BTreeMap::new() };
        for m in models {
            validate_model(&m)?;
            for name in std::iter::once(&m.id).chain(&m.aliases) {
                if table.models.contains_key(name) || table.aliases.contains_key(name) {
                    return Err(Error::PriceTable(format!("model name {name:?} appears twice")));
                }
                table.aliases.insert(name.clone(), m.id.clone());
            }
            table.models.insert(m.id.clone(), m);
        }
        // Ids are in `aliases` too (mapping to themselves) so one lookup resolves both.
        Ok(table)
    }

    /// Parses a TOML table (`[[model]]` entries, see `data/prices.toml`).
    pub fn from_toml_str(s: &str) -> Result<Self> {
        let file: TableFile = toml::from_str(s).map_err(|e| Error::PriceTable(e.to_string()))?;
        PriceTable::new(file.model)
    }

    /// Parses a JSON table: `{"model": [{...}, ...]}` with the same fields as the TOML form.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let file: TableFile = serde_json::from_str(s).map_err(|e| Error::PriceTable(e.to_string()))?;
        PriceTable::new(file.model)
    }

    /// Loads a table from a `.toml` or `.json` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::PriceTable(format!("{}: {e}", path.display())))?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => PriceTable::from_json_str(&text),
            Some("toml") => PriceTable::from_toml_str(&text),
            _ => Err(Error::PriceTable(format!("{}: expected a .toml or .json file", path.display()))),
        }
    }

    /// Looks a model up by id or alias.
    pub fn get(&self, model: &str) -> Result<&ModelPrice> {
        self.aliases.get(model).and_then(|id| self.models.get(id)).ok_or_else(|| Error::UnknownModel(model.to_owned()))
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelPrice> {
        self.models.values()
    }
}

fn validate_model(m: &ModelPrice) -> Result<()> {
    let bad = |reason: String| Err(Error::PriceTable(format!("model {:?}: {reason}", m.id)));
    for name in std::iter::once(&m.id).chain(&m.aliases) {
        if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad(format!("bad model name {name:?}"));
        }
    }
    for (field, rate) in [
        ("input", m.input_usd_per_mtok),
        ("output", m.output_usd_per_mtok),
        ("cache_read", m.cache_read_usd_per_mtok),
        ("cache_write", m.cache_write_usd_per_mtok),
    ] {
        if rate.is_sign_negative() || rate > MAX_RATE_USD_PER_MTOK {
            return bad(format!("{field} price {rate} is outside 0..={MAX_RATE_USD_PER_MTOK}"));
        }
    }
    if !(1..=100).contains(&m.multiplier) {
        return bad(format!("multiplier {} is outside 1..=100", m.multiplier));
    }
    if m.max_output_tokens == 0 || u64::from(m.max_output_tokens) > MAX_TOKENS {
        return bad(format!("max_output_tokens {} is out of range", m.max_output_tokens));
    }
    Ok(())
}

/// Tokens of one run as the provider reports them. `input` excludes cache reads and writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl TokenUsage {
    /// All tokens, as counted for credits.
    pub fn total(&self) -> u64 {
        self.input + self.output + self.cache_read + self.cache_write
    }

    pub(crate) fn validate(&self) -> Result<()> {
        for (field, n) in
            [("input_tokens", self.input), ("output_tokens", self.output), ("cache_read_tokens", self.cache_read), ("cache_write_tokens", self.cache_write)]
        {
            if n > MAX_TOKENS {
                return Err(Error::invalid(field, format!("{n} is more than {MAX_TOKENS}")));
            }
        }
        Ok(())
    }
}

/// Credits for `total_tokens` at `multiplier`: ceil(tokens / 5,000), at least 1, times the
/// multiplier.
pub fn credits_for_tokens(total_tokens: u64, multiplier: u32) -> u64 {
    let base = total_tokens.div_ceil(TOKENS_PER_CREDIT).max(1);
    base * u64::from(multiplier)
}

/// The exact USD cost of `usage` on `price`.
pub fn cost_usd(price: &ModelPrice, usage: &TokenUsage) -> Decimal {
    let per_mtok = Decimal::from(1_000_000u32);
    let sum = Decimal::from(usage.input) * price.input_usd_per_mtok
        + Decimal::from(usage.output) * price.output_usd_per_mtok
        + Decimal::from(usage.cache_read) * price.cache_read_usd_per_mtok
        + Decimal::from(usage.cache_write) * price.cache_write_usd_per_mtok;
    sum / per_mtok
}

/// Converts USD to whole micro-dollars, rounding up.
pub fn usd_to_micros_ceil(usd: Decimal) -> i64 {
    use rust_decimal::prelude::ToPrimitive;
    (usd * Decimal::from(1_000_000u32)).ceil().to_i64().expect("bounded by MAX_TOKENS and rates")
}

/// Formats micro-dollars as a USD amount with six decimals (`"0.012345"`).
pub fn micros_to_usd(cost_micros: i64) -> Decimal {
    Decimal::new(cost_micros, 6)
}

/// Micro-dollars as exact USD text with at least two decimals (`"0.0087"`, `"120.00"`).
pub fn format_usd(cost_micros: i64) -> String {
    let mut d = micros_to_usd(cost_micros).normalize();
    if d.scale() < 2 {
        d.rescale(2);
    }
    d.to_string()
}

/// Credits and cost of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    pub tokens: u64,
    pub credits: u64,
    pub cost_micros: i64,
}

/// A pre-run estimate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    pub model: String,
    /// Input + max output tokens: what a hold reserves.
    pub worst_case: Quote,
    /// Input + expected output tokens: what the run will most likely cost.
    pub expected: Quote,
    /// The worst case costs at least [`Pricing::expensive_credits`].
    pub expensive: bool,
}

/// What to estimate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EstimateRequest {
    pub model: String,
    /// Input tokens: system prompt + history + user input.
    pub input_tokens: u64,
    /// The run's `max_tokens`; defaults to [`Pricing::default_max_output_tokens`], capped by
    /// the model's limit.
    pub max_output_tokens: Option<u32>,
    /// Expected output; defaults to a quarter of the max output, rounded up.
    pub expected_output_tokens: Option<u32>,
}

/// Pricing rules: the price table plus the request cap and estimate defaults.
#[derive(Debug, Clone)]
pub struct Pricing {
    pub table: PriceTable,
    /// Cap on a request's input tokens (default 20,000).
    pub request_cap_tokens: u64,
    /// `max_tokens` used for estimates when a request does not name one.
    pub default_max_output_tokens: u32,
    /// A worst case of at least this many credits is flagged as expensive.
    pub expensive_credits: u64,
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing { table: PriceTable::default(), request_cap_tokens: DEFAULT_REQUEST_CAP_TOKENS, default_max_output_tokens: 4_096, expensive_credits: 5 }
    }
}

impl Pricing {
    pub fn with_table(table: PriceTable) -> Self {
        Pricing { table, ..Pricing::default() }
    }

    /// Refuses a request whose input is over the cap.
    pub fn check_request_size(&self, input_tokens: u64) -> Result<()> {
        if input_tokens > self.request_cap_tokens {
            return Err(Error::RequestTooLarge { tokens: input_tokens, cap_tokens: self.request_cap_tokens });
        }
        Ok(())
    }

    /// Credits and cost of a finished run from the provider's reported usage.
    pub fn price_usage(&self, model: &str, usage: &TokenUsage) -> Result<Quote> {
        usage.validate()?;
        let price = self.table.get(model)?;
        Ok(quote(price, usage))
    }

    /// The pre-run estimate: worst case (input + max output) and expected case.
    pub fn estimate(&self, req: &EstimateRequest) -> Result<Estimate> {
        let price = self.table.get(&req.model)?;
        if req.input_tokens > MAX_TOKENS {
            return Err(Error::invalid("input_tokens", format!("more than {MAX_TOKENS}")));
        }
        self.check_request_size(req.input_tokens)?;
        let max_out = req.max_output_tokens.unwrap_or(self.default_max_output_tokens.min(price.max_output_tokens));
        if max_out == 0 || max_out > price.max_output_tokens {
            return Err(Error::invalid("max_output_tokens", format!("{max_out} is outside 1..={} for {}", price.max_output_tokens, price.id)));
        }
        let expected_out = req.expected_output_tokens.unwrap_or(max_out.div_ceil(4));
        if expected_out > max_out {
            return Err(Error::invalid("expected_output_tokens", format!("{expected_out} is more than max_output_tokens {max_out}")));
        }
        let worst_case = quote(price, &TokenUsage { input: req.input_tokens, output: max_out.into(), ..Default::default() });
        let expected = quote(price, &TokenUsage { input: req.input_tokens, output: expected_out.into(), ..Default::default() });
        Ok(Estimate { model: price.id.clone(), expensive: worst_case.credits >= self.expensive_credits, worst_case, expected })
    }
}

fn quote(price: &ModelPrice, usage: &TokenUsage) -> Quote {
    Quote { tokens: usage.total(), credits: credits_for_tokens(usage.total(), price.multiplier), cost_micros: usd_to_micros_ceil(cost_usd(price, usage)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::dec;

    #[test]
    fn credits_round_up_with_minimum_one() {
        assert_eq!(credits_for_tokens(0, 1), 1);
        assert_eq!(credits_for_tokens(1, 1), 1);
        assert_eq!(credits_for_tokens(5_000, 1), 1);
        assert_eq!(credits_for_tokens(5_001, 1), 2);
        assert_eq!(credits_for_tokens(20_000, 1), 4);
        assert_eq!(credits_for_tokens(5_001, 5), 10);
        assert_eq!(credits_for_tokens(0, 5), 5);
    }

    #[test]
    fn default_table_has_current_models_and_opus_is_5x() {
        let t = PriceTable::default();
        assert_eq!(t.get("claude-opus-4-5").unwrap().multiplier, 5);
        assert_eq!(t.get("claude-opus-4-5-20251101").unwrap().id, "claude-opus-4-5");
        assert_eq!(t.get("claude-sonnet-4-5").unwrap().multiplier, 1);
        assert_eq!(t.get("gpt-4o-mini").unwrap().provider, Provider::Openai);
        assert!(matches!(t.get("gpt-2"), Err(Error::UnknownModel(m)) if m == "gpt-2"));
    }

    #[test]
    fn usage_cost_is_exact_and_rounds_up_to_micros() {
        let p = Pricing::default();
        // Sonnet: 1,000 in * $3 + 500 out * $15 + 2,000 cache read * $0.30 + 100 write * $3.75
        // = 3,000 + 7,500 + 600 + 375 = 11,475 micro-dollars.
        let u = TokenUsage { input: 1_000, output: 500, cache_read: 2_000, cache_write: 100 };
        let q = p.price_usage("claude-sonnet-4-5", &u).unwrap();
        assert_eq!(q.cost_micros, 11_475);
        assert_eq!(q.tokens, 3_600);
        assert_eq!(q.credits, 1);
        // gpt-4o-mini: 1 input token = $0.15 / 1M = 0.15 micro-dollars -> rounds up to 1.
        let q = p.price_usage("gpt-4o-mini", &TokenUsage { input: 1, ..Default::default() }).unwrap();
        assert_eq!(q.cost_micros, 1);
        let price = p.table.get("gpt-4o-mini").unwrap();
        assert_eq!(cost_usd(price, &TokenUsage { input: 1, ..Default::default() }), dec!(0.00000015));
    }

    #[test]
    fn estimate_worst_and_expected() {
        let p = Pricing::default();
        let e = p
            .estimate(&EstimateRequest { model: "claude-opus-4-5".into(), input_tokens: 6_000, max_output_tokens: Some(4_000), expected_output_tokens: None })
            .unwrap();
        // worst: 10,000 tokens -> 2 credits * 5 = 10; $5*6000 + $25*4000 = 30,000 + 100,000 micros
        assert_eq!(e.worst_case, Quote { tokens: 10_000, credits: 10, cost_micros: 130_000 });
        // expected: 6,000 + 1,000 -> 2 credits * 5; 30,000 + 25,000
        assert_eq!(e.expected, Quote { tokens: 7_000, credits: 10, cost_micros: 55_000 });
        assert!(e.expensive);
    }

    #[test]
    fn request_cap_is_enforced() {
        let p = Pricing::default();
        assert!(p.check_request_size(20_000).is_ok());
        let err = p.estimate(&EstimateRequest { model: "claude-sonnet-4-5".into(), input_tokens: 20_001, ..Default::default() }).unwrap_err();
        assert_eq!(err.code(), "request_too_large");
        let p15 = Pricing { request_cap_tokens: 15_000, ..Pricing::default() };
        assert!(p15.check_request_size(15_001).is_err());
    }

    #[test]
    fn malformed_tables_are_rejected() {
        for (text, why) in [
            ("", "empty"),
            ("[[model]]\nid = \"x\"\n", "missing fields"),
            (
                "[[model]]\nid=\"x\"\nprovider=\"anthropic\"\ninput=\"-1\"\noutput=\"1\"\ncache_read=\"0\"\ncache_write=\"0\"\nmultiplier=1\nmax_output_tokens=10\n",
                "negative",
            ),
            (
                "[[model]]\nid=\"x\"\nprovider=\"anthropic\"\ninput=\"1\"\noutput=\"1\"\ncache_read=\"0\"\ncache_write=\"0\"\nmultiplier=0\nmax_output_tokens=10\n",
                "zero multiplier",
            ),
            (
                "[[model]]\nid=\"x\"\nprovider=\"mars\"\ninput=\"1\"\noutput=\"1\"\ncache_read=\"0\"\ncache_write=\"0\"\nmultiplier=1\nmax_output_tokens=10\n",
                "provider",
            ),
            (
                "[[model]]\nid=\"x\"\nprovider=\"anthropic\"\ninput=\"1\"\noutput=\"1\"\ncache_read=\"0\"\ncache_write=\"0\"\nmultiplier=1\nmax_output_tokens=10\n[[model]]\nid=\"x\"\nprovider=\"anthropic\"\ninput=\"1\"\noutput=\"1\"\ncache_read=\"0\"\ncache_write=\"0\"\nmultiplier=1\nmax_output_tokens=10\n",
                "duplicate",
            ),
        ] {
            let err = PriceTable::from_toml_str(text).expect_err(why);
            assert_eq!(err.code(), "invalid_price_table", "{why}");
        }
        assert!(PriceTable::from_json_str("{\"model\": 3}").is_err());
    }

    #[test]
    fn tables_load_from_toml_and_json_files() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("p.toml");
        std::fs::write(&toml_path, DEFAULT_PRICES_TOML).unwrap();
        let from_toml = PriceTable::load(&toml_path).unwrap();
        assert_eq!(from_toml, PriceTable::default());
        let json = r#"{"model":[{"id":"local-llama","provider":"openai_compatible","input":"0","output":"0.5","cache_read":"0","cache_write":"0","multiplier":1,"max_output_tokens":8192}]}"#;
        let json_path = dir.path().join("p.json");
        std::fs::write(&json_path, json).unwrap();
        let t = PriceTable::load(&json_path).unwrap();
        assert_eq!(t.get("local-llama").unwrap().output_usd_per_mtok, dec!(0.5));
        assert!(PriceTable::load(dir.path().join("p.yaml")).is_err());
        assert!(PriceTable::load(dir.path().join("missing.toml")).is_err());
    }
}
