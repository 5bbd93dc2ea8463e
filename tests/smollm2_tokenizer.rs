//! The real SmolLM2-135M-Instruct GGUF: our tokenizer and chat template against reference values
//! from Hugging Face (transformers 5.24, tokenizers 0.23): the fast tokenizer transformers' GGUF
//! converter builds from this file's metadata, with SmolLM2's upstream pre-tokenizer (digits split,
//! then byte-level), and `apply_chat_template(..., tokenize=False)`. Needs the model file, which
//! `tunegate model fetch` or scripts/test.sh put in place; without it these tests fail.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use tunegate::engine::{ChatMessage, ChatTemplate, Tokenizer};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// (text, Hugging Face ids with add_special_tokens=True: SmolLM2 adds no BOS).
const ENCODINGS: &[(&str, &[u32])] = &[
    (
        "Hello world! The quick brown fox jumps over the lazy dog.",
        &[19556, 905, 17, 378, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30],
    ),
    (" leading space and  double  spaces", &[2899, 1898, 284, 216, 5561, 216, 5600]),
    ("12345 and 3.14", &[33, 34, 35, 36, 37, 284, 216, 35, 30, 33, 36]),
    (
        "def add(a, b):\n    return a + b\n\n\tif x:\n        pass\n",
        &[1604, 803, 24, 81, 28, 278, 727, 472, 1003, 253, 1232, 278, 1116, 197, 342, 1792, 42, 448, 1301, 198],
    ),
    ("café 日本語 🙂", &[83, 1939, 2756, 17097, 241, 115, 40993, 179, 120, 248, 47526]),
    ("<|im_start|>user\nhi<|im_end|>\n", &[1, 4093, 198, 6004, 2, 198]),
];

const SYSTEM_USER_PROMPT: &str = "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n\
    <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
const SYSTEM_USER_IDS: &[u32] = &[
    1, 9690, 198, 2683, 359, 253, 1733, 313, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2,
    198, 1, 520, 9531, 198,
];
const USER_ONLY_PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
    Hugging Face<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n";
const USER_ONLY_IDS: &[u32] = &[
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
    198, 1, 4093, 198, 19556, 17, 2, 198, 1, 520, 9531, 198,
];

fn model_path() -> Result<PathBuf, String> {
    let path = match std::env::var_os("TUNEGATE_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the SmolLM2 model file is missing at {}: run `tunegate model fetch` or scripts/test.sh \
             (or set TUNEGATE_TEST_MODEL)",
            path.display()
        ))
    }
}

fn metadata() -> Result<HashMap<String, gguf_file::Value>, Box<dyn std::error::Error>> {
    let path = model_path()?;
    let mut file = std::fs::File::open(&path)?;
    Ok(gguf_file::Content::read(&mut file)?.metadata)
}

#[test]
fn smollm2_token_ids_match_hugging_face() -> TestResult {
    let tk = Tokenizer::from_gguf(&metadata()?)?;
    assert_eq!(tk.vocab_size(), 49152);
    assert_eq!(tk.bos_token(), Some("<|im_start|>"));
    assert_eq!(tk.eos_token(), Some("<|im_end|>"));
    assert_eq!(tk.eos_token_ids(), [2, 0]);
    for (text, want) in ENCODINGS {
        let ids = tk.encode(text, true)?;
        assert_eq!(&ids, want, "ids for {text:?}");
        assert_eq!(&tk.decode(&ids, false)?, text, "decode of {text:?}");
    }
    let ids = tk.encode("<|im_start|>user\nhi<|im_end|>\n", true)?;
    assert_eq!(tk.decode(&ids, true)?, "user\nhi\n");
    Ok(())
}

#[test]
fn smollm2_chat_prompts_match_hugging_face() -> TestResult {
    let md = metadata()?;
    let tk = Tokenizer::from_gguf(&md)?;
    let template = ChatTemplate::from_gguf(&md, tk.bos_token(), tk.eos_token())?
        .ok_or("the SmolLM2 file should carry tokenizer.chat_template")?;

    let system_user =
        [ChatMessage::new("system", "You are a terse assistant."), ChatMessage::new("user", "What is 2+2?")];
    let prompt = template.render(&system_user, true)?;
    assert_eq!(prompt, SYSTEM_USER_PROMPT);
    assert_eq!(tk.encode(&prompt, false)?, SYSTEM_USER_IDS);

    let user_only = [ChatMessage::new("user", "Hello!")];
    let prompt = template.render(&user_only, true)?;
    assert_eq!(prompt, USER_ONLY_PROMPT);
    assert_eq!(tk.encode(&prompt, false)?, USER_ONLY_IDS);

    let no_generation = template.render(&user_only, false)?;
    assert_eq!(Some(no_generation.as_str()), USER_ONLY_PROMPT.strip_suffix("<|im_start|>assistant\n"));
    Ok(())
}
