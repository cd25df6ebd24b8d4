//! Property: however Step3's output text is cut into pieces (markers and multi-byte characters
//! split, several tokens in one piece), the streamed deltas add up to the non-streamed answer —
//! reasoning, content and tool calls (arguments never lost).

use serde_json::Value;
use step3::engine::Event;
use step3::{OutputEvent, OutputParser};
use step3_server::{delta, Choice, Piece, ToolSet};

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `text` cut at random character boundaries into pieces of 1 to `max` characters.
fn cut(text: &str, rng: &mut Rng, max: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let n = 1 + rng.below(max);
        out.push(chars[i..(i + n).min(chars.len())].iter().collect());
        i += n;
    }
    out
}

/// What a client reassembles from the streamed deltas: (reasoning, content, [(name, arguments)]).
fn streamed(pieces: &[String], tools: &ToolSet) -> (String, String, Vec<(String, String)>) {
    let mut parser = OutputParser::new(true);
    let mut choice = Choice::new(0, "p".into());
    let mut deltas: Vec<Value> = Vec::new();
    let mut feed = |events: Vec<OutputEvent>, choice: &mut Choice| {
        for e in events {
            let e = match e {
                OutputEvent::Reasoning(s) => Event::Reasoning(s),
                OutputEvent::Content(s) => Event::Content(s),
                OutputEvent::ToolCall(t) => Event::ToolCall(t),
            };
            for p in choice.push(e, tools, None) {
                deltas.extend(delta(&p));
            }
        }
    };
    for p in pieces {
        let events = parser.push(p);
        feed(events, &mut choice);
    }
    let events = parser.finish();
    feed(events, &mut choice);
    let (mut reasoning, mut content, mut calls) = (String::new(), String::new(), Vec::<(String, String)>::new());
    for d in deltas {
        reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(d["content"].as_str().unwrap_or(""));
        for c in d["tool_calls"].as_array().into_iter().flatten() {
            let k = c["index"].as_u64().unwrap() as usize;
            if calls.len() <= k {
                calls.push((c["function"]["name"].as_str().unwrap().to_string(), String::new()));
            }
            calls[k].1.push_str(c["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    (reasoning, content, calls)
}

/// The non-streamed answer from the whole text at once.
fn whole(text: &str, tools: &ToolSet) -> (String, String, Vec<(String, String)>) {
    let mut parser = OutputParser::new(true);
    let mut choice = Choice::new(0, "p".into());
    let mut events = parser.push(text);
    events.extend(parser.finish());
    for e in events {
        let e = match e {
            OutputEvent::Reasoning(s) => Event::Reasoning(s),
            OutputEvent::Content(s) => Event::Content(s),
            OutputEvent::ToolCall(t) => Event::ToolCall(t),
        };
        let _: Vec<Piece> = choice.push(e, tools, None);
    }
    let calls = choice.tool_calls.iter().map(|c| (c.function.name.clone(), c.function.arguments.clone())).collect();
    (choice.reasoning, choice.content, calls)
}

fn call(name: &str, args: &[(&str, &str)]) -> String {
    let mut s = format!("<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"{name}\">");
    for (k, v) in args {
        s.push_str(&format!("<steptml:parameter name=\"{k}\">{v}</steptml:parameter>"));
    }
    s + "</steptml:invoke><｜tool_call_end｜>"
}

#[test]
fn deltas_add_up_to_the_whole_answer_however_the_text_is_cut() {
    let tools = ToolSet(
        [
            (
                "get_weather".to_string(),
                serde_json::json!({"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}),
            ),
            ("now".to_string(), serde_json::json!({"properties": {}})),
        ]
        .into_iter()
        .collect(),
    );
    let weather = call("get_weather", &[("city", "Zürich <Nord>\n& \"Süd\" 🦀"), ("days", "3")]);
    /// A script and the (reasoning, content, calls as (name, arguments)) it must give.
    type Script<'a> = (String, (&'a str, &'a str, Vec<(&'a str, &'a str)>));
    let scripts: Vec<Script> = vec![
        // Reasoning, text, two calls (one without arguments).
        (
            format!(
                "Let me think… 思考.</think>Sure, checking.<｜tool_calls_begin｜>{weather}{}<｜tool_calls_end｜>",
                call("now", &[])
            ),
            (
                "Let me think… 思考.",
                "Sure, checking.",
                vec![("get_weather", r#"{"city":"Zürich <Nord>\n& \"Süd\" 🦀","days":3}"#), ("now", "{}")],
            ),
        ),
        // A call right after the reasoning, no text.
        (
            format!("ok</think><｜tool_calls_begin｜>{}<｜tool_calls_end｜>", call("now", &[])),
            ("ok", "", vec![("now", "{}")]),
        ),
        // No reasoning end: all reasoning, markers kept as text.
        (
            "still thinking <steptml:invoke name=\"x\"> and < signs".to_string(),
            ("still thinking <steptml:invoke name=\"x\"> and < signs", "", vec![]),
        ),
        // Text only, with a '<' that is not a marker.
        ("r</think>a < b, and <｜not a marker｜>".to_string(), ("r", "a < b, and <｜not a marker｜>", vec![])),
    ];
    for (text, (reasoning, content, calls)) in &scripts {
        let reference = whole(text, &tools);
        let want_calls: Vec<(String, String)> = calls.iter().map(|(n, a)| (n.to_string(), a.to_string())).collect();
        assert_eq!(reference, (reasoning.to_string(), content.to_string(), want_calls), "{text}");
        let mut rng = Rng(7);
        for round in 0..400 {
            let max = [1, 2, 3, 7, 40, 1000][round % 6];
            let pieces = cut(text, &mut rng, max);
            assert_eq!(streamed(&pieces, &tools), reference, "{text} cut as {pieces:?}");
        }
    }
}
