//! Counting a request's input tokens before the run, for the estimate, the hold and the
//! request cap.
//!
//! * **OpenAI models**: the real tokenizer (`o200k_base` for the GPT-4o, GPT-4.1, GPT-5 and
//!   o-series families, `cl100k_base` for GPT-4 and GPT-3.5), plus the chat format's framing:
//!   3 tokens per message and 3 that prime the reply, as OpenAI documents for these models.
//! * **Claude models and OpenAI-compatible servers** (whose tokenizers are not public or not
//!   known): a conservative approximation that errs high: one token per 3 ASCII characters
//!   (English prose runs at about 4 per token, code at 3 to 3.5) and one per non-ASCII
//!   character (CJK text runs at about one per character, accented letters at less), plus
//!   4 tokens of framing per message and 4 for the reply. An estimate that errs high holds a
//!   little more than the run will use; the settle charges the provider's reported usage.

use crate::pricing::Provider;
use crate::session::Role;

/// Framing tokens per message and for the reply, OpenAI chat format.
const OPENAI_PER_MESSAGE: u64 = 3;
const OPENAI_REPLY: u64 = 3;
/// Framing tokens per message and for the reply, approximation.
const APPROX_PER_MESSAGE: u64 = 4;
const APPROX_REPLY: u64 = 4;

/// Which counter a model gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    O200k,
    Cl100k,
    Approximate,
}

impl Counter {
    pub fn for_model(provider: Provider, model: &str) -> Counter {
        match provider {
            // GPT-4 and GPT-3.5 (and their dated or Azure names) are cl100k; every later
            // family (GPT-4o, GPT-4.1, GPT-4.5, GPT-5, o1/o3/o4) is o200k.
            Provider::Openai if is_cl100k(model) => Counter::Cl100k,
            Provider::Openai => Counter::O200k,
            Provider::Anthropic | Provider::OpenaiCompatible => Counter::Approximate,
        }
    }

    /// Tokens of `text` alone.
    pub fn count(self, text: &str) -> u64 {
        match self {
            Counter::O200k => bpe_openai::o200k_base().count(text) as u64,
            Counter::Cl100k => bpe_openai::cl100k_base().count(text) as u64,
            Counter::Approximate => approximate(text),
        }
    }

    /// Input tokens of a chat request: system prompt, then the messages, with their framing.
    pub fn count_chat<'a>(self, system: Option<&str>, messages: impl IntoIterator<Item = (Role, &'a str)>) -> u64 {
        let (per, reply) = match self {
            Counter::O200k | Counter::Cl100k => (OPENAI_PER_MESSAGE, OPENAI_REPLY),
            Counter::Approximate => (APPROX_PER_MESSAGE, APPROX_REPLY),
        };
        let mut n = reply;
        if let Some(s) = system.filter(|s| !s.is_empty()) {
            n += per + self.count(s);
        }
        for (_, text) in messages {
            n += per + self.count(text);
        }
        n
    }
}

fn is_cl100k(model: &str) -> bool {
    let m = model.strip_prefix("ft:").unwrap_or(model);
    let older = ["gpt-4", "gpt-3.5", "gpt-35"];
    let newer = ["gpt-4o", "gpt-4.1", "gpt-4.5"];
    older.iter().any(|p| m.starts_with(p)) && !newer.iter().any(|p| m.starts_with(p))
}

/// ceil(ASCII characters / 3) + non-ASCII characters.
pub fn approximate(text: &str) -> u64 {
    let ascii = text.bytes().filter(u8::is_ascii).count() as u64;
    let other = text.chars().filter(|c| !c.is_ascii()).count() as u64;
    ascii.div_ceil(3) + other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_counts_are_the_real_tokenizer() {
        // "hello world" is two tokens in both vocabularies.
        assert_eq!(Counter::for_model(Provider::Openai, "gpt-4o").count("hello world"), 2);
        assert_eq!(Counter::for_model(Provider::Openai, "gpt-4").count("hello world"), 2);
        assert_eq!(Counter::for_model(Provider::Openai, "gpt-4"), Counter::Cl100k);
        assert_eq!(Counter::for_model(Provider::Openai, "gpt-5-mini"), Counter::O200k);
        assert_eq!(Counter::for_model(Provider::Openai, "gpt-4o-mini"), Counter::O200k);
        assert_eq!(Counter::for_model(Provider::Openai, "gpt-4.1-nano"), Counter::O200k);
        assert_eq!(Counter::for_model(Provider::Openai, "gpt-4-turbo-2024-04-09"), Counter::Cl100k);
        assert_eq!(Counter::for_model(Provider::Openai, "gpt-3.5-turbo"), Counter::Cl100k);
        assert_eq!(Counter::for_model(Provider::Anthropic, "gpt-4"), Counter::Approximate);
        // system + one user message: 3 + 3 framing each, 3 for the reply.
        let c = Counter::O200k;
        assert_eq!(c.count_chat(Some("hello world"), [(Role::User, "hello world")]), 3 + (3 + 2) + (3 + 2));
    }

    /// The fast tokenizer (GitHub's `bpe`) counts exactly what OpenAI's reference tokenizer
    /// (tiktoken) counts, on prose, code, numbers, whitespace runs, CJK, emoji and special-token
    /// look-alikes.
    #[test]
    fn counts_match_the_reference_tokenizer() {
        let samples = [
            "hello world".to_owned(),
            "The quick brown fox jumps over the lazy dog. ".repeat(50),
            "fn main() {\n    let x: Vec<u64> = (0..1_000).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n".repeat(20),
            "3.14159265358979 2718281828 1,234,567.89 0x7fffffff ".repeat(20),
            "  \n\n\t\t   trailing   \r\n spaces \n\n\n".repeat(30),
            "日本語のテキストです。中文文本。한국어 텍스트. ".repeat(30),
            "emoji 🎉🚀👩‍💻 and accents: café naïve Ångström ".repeat(30),
            "<|endoftext|> <|im_start|>user literal special tokens".to_owned(),
        ];
        for s in &samples {
            assert_eq!(Counter::O200k.count(s), tiktoken_rs::o200k_base_singleton().count_ordinary(s) as u64, "o200k: {}", &s[..s.len().min(40)]);
            assert_eq!(Counter::Cl100k.count(s), tiktoken_rs::cl100k_base_singleton().count_ordinary(s) as u64, "cl100k: {}", &s[..s.len().min(40)]);
        }
    }

    #[test]
    fn the_approximation_errs_high_on_prose_and_cjk() {
        let prose = "The quick brown fox jumps over the lazy dog. ".repeat(40);
        let real = Counter::O200k.count(&prose);
        assert!(approximate(&prose) > real, "{} vs {real}", approximate(&prose));
        let cjk = "日本語のテキストです。".repeat(20);
        assert!(approximate(&cjk) >= Counter::O200k.count(&cjk));
        assert_eq!(approximate(""), 0);
        assert_eq!(approximate("abcd"), 2);
        assert_eq!(approximate("é"), 1);
    }
}
