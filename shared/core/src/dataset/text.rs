//! Next-character prediction on Shakespeare's plays, partitioned by speaking role: LEAF's
//! naturally non-IID text benchmark (Caldas et al. 2018, "LEAF: A Benchmark for Federated
//! Settings"; McMahan et al. 2017 used the same task).
//!
//! The source is `speeches.tsv.gz` (header `play\trole\ttext`, one speech a line; how it is
//! made: `simulations/scripts/fetch-data.sh`). Each (play, role) pair is one client, as in
//! LEAF; its speeches are joined with single spaces into one text, and every position of it
//! gives one example: the [`SEQ_LEN`] characters before it as input, the character as label
//! (LEAF's windows, stride one). Characters are LEAF's 80-symbol [`VOCAB`]; any other
//! character maps to the space.
//!
//! Each role's windows are split in text order, not at random: the first 80% train, the last
//! 20% test, so no test target is ever a training target or inside a training input (with a
//! random split, a test window is almost always a training window shifted by one character,
//! whose input holds the test's answer). Roles with fewer than [`MIN_WINDOWS`] windows are
//! dropped.
//!
//! The examples live in a [`Dataset`] with `rows = 1`, `cols = SEQ_LEN`: the "pixels" are
//! character indices; `TrainTest::natural` says whose each training example is.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::{Dataset, DatasetError, TrainTest};

/// Characters of input per example (LEAF's 80).
pub const SEQ_LEN: usize = 80;

/// LEAF's vocabulary (`ALL_LETTERS` in its `language_utils.py`): 80 symbols; a character's
/// class is its position here.
pub const VOCAB: &[u8; 80] = b"\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}";

/// Fewest windows a role needs to be kept (a client with a handful of examples has no test
/// set worth the name).
pub const MIN_WINDOWS: usize = 100;

/// Share of each role's windows that train (in text order).
pub const TRAIN_FRACTION: f64 = 0.8;

/// Largest speeches file accepted, decompressed (the full corpus is 5 MB).
pub const MAX_TEXT_BYTES: u64 = 256 << 20;

/// The class of a character: its index in [`VOCAB`], the space's for anything else.
pub fn class_of(c: u8) -> u8 {
    static TABLE: std::sync::OnceLock<[u8; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let space = VOCAB.iter().position(|&v| v == b' ').expect("the vocabulary has a space") as u8;
        let mut t = [space; 256];
        for (i, &v) in VOCAB.iter().enumerate() {
            t[v as usize] = i as u8;
        }
        t
    });
    table[c as usize]
}

/// The character of a class (`?` past the vocabulary).
pub fn char_of(class: u8) -> char {
    VOCAB.get(class as usize).map_or('?', |&c| c as char)
}

/// One client's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The play.
    pub play: String,
    /// The speaking role.
    pub role: String,
    /// Its speeches joined with spaces, as classes.
    pub text: Vec<u8>,
}

/// The windows of every kept role, split per role.
#[derive(Debug, Clone)]
pub struct TextData {
    /// Training and test windows; `natural` holds each training example's index in `roles`.
    pub data: TrainTest,
    /// The kept roles, in file order.
    pub roles: Vec<Role>,
}

/// Reads `speeches.tsv.gz` (or an uncompressed `.tsv`) and builds the windows.
pub fn read_speeches_file(path: &Path) -> Result<TextData, DatasetError> {
    let file = std::fs::File::open(path).map_err(|cause| DatasetError::Io { path: path.to_path_buf(), cause })?;
    let gz = path.extension().is_some_and(|e| e == "gz");
    let reader: Box<dyn Read> = if gz { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let roles = read_roles(reader.take(MAX_TEXT_BYTES + 1))
        .map_err(|reason| DatasetError::Format { path: path.to_path_buf(), reason })?;
    Ok(windows(roles))
}

/// Reads speeches (`play\trole\ttext` lines after a header) into roles, in order of first
/// appearance. Errors are human-readable reasons.
pub fn read_roles<R: Read>(reader: R) -> Result<Vec<Role>, String> {
    let mut reader = BufReader::new(reader);
    let mut roles: Vec<Role> = Vec::new();
    let mut index = std::collections::HashMap::<(String, String), usize>::new();
    let mut line = Vec::new();
    let mut total = 0u64;
    let mut number = 0usize;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_TEXT_BYTES {
            return Err(format!("more than {MAX_TEXT_BYTES} bytes of speeches"));
        }
        number += 1;
        let text = std::str::from_utf8(&line).map_err(|_| format!("line {number}: not UTF-8"))?;
        let text = text.trim_end_matches(['\n', '\r']);
        if number == 1 {
            if text != "play\trole\ttext" {
                return Err(format!("line 1: expected the header `play<TAB>role<TAB>text`, found `{}`", clip(text)));
            }
            continue;
        }
        if text.is_empty() {
            continue;
        }
        let mut fields = text.splitn(3, '\t');
        let (Some(play), Some(role), Some(speech)) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!("line {number}: expected three tab-separated fields"));
        };
        let key = (play.to_string(), role.to_string());
        let i = *index.entry(key).or_insert_with(|| {
            roles.push(Role { play: play.to_string(), role: role.to_string(), text: Vec::new() });
            roles.len() - 1
        });
        let text = &mut roles[i].text;
        if !text.is_empty() {
            text.push(class_of(b' '));
        }
        text.extend(speech.bytes().map(class_of));
    }
    if number == 0 {
        return Err("empty file (expected the header `play<TAB>role<TAB>text`)".into());
    }
    Ok(roles)
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Windows of each role with at least [`MIN_WINDOWS`], split [`TRAIN_FRACTION`] in text order.
pub fn windows(roles: Vec<Role>) -> TextData {
    let empty = || Dataset { rows: 1, cols: SEQ_LEN, images: Vec::new(), labels: Vec::new(), num_classes: VOCAB.len() };
    let (mut train, mut test) = (empty(), empty());
    let mut train_roles = Vec::new();
    let mut kept = Vec::new();
    for role in roles {
        let n = role.text.len().saturating_sub(SEQ_LEN);
        if n < MIN_WINDOWS {
            continue;
        }
        let n_train = ((n as f64 * TRAIN_FRACTION) as usize).max(1);
        let id = kept.len() as u32;
        for end in SEQ_LEN..SEQ_LEN + n_train {
            train.images.extend_from_slice(&role.text[end - SEQ_LEN..end]);
            train.labels.push(role.text[end]);
            train_roles.push(id);
        }
        // The rest test: their targets come after every training window's.
        for end in SEQ_LEN + n_train..role.text.len() {
            test.images.extend_from_slice(&role.text[end - SEQ_LEN..end]);
            test.labels.push(role.text[end]);
        }
        kept.push(role);
    }
    TextData { data: TrainTest { train, test, natural: Some(train_roles) }, roles: kept }
}

/// The Shakespeare sample compiled into the binary: the speeches of the roles of two plays
/// (`shared/core/data/README.md`), for tests and a first run with nothing downloaded.
pub fn embedded_sample() -> Result<TextData, DatasetError> {
    static SAMPLE: &[u8] = include_bytes!("../../data/shakespeare-sample.tsv.gz");
    let roles = read_roles(flate2::read::GzDecoder::new(SAMPLE).take(MAX_TEXT_BYTES + 1))
        .map_err(|reason| DatasetError::Format { path: "<embedded shakespeare sample>".into(), reason })?;
    Ok(windows(roles))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tsv(rows: &[(&str, &str, &str)]) -> Vec<u8> {
        let mut s = String::from("play\trole\ttext\n");
        for (p, r, t) in rows {
            s.push_str(&format!("{p}\t{r}\t{t}\n"));
        }
        s.into_bytes()
    }

    #[test]
    fn the_vocabulary_is_leafs() {
        assert_eq!(VOCAB.len(), 80);
        assert_eq!(class_of(b'\n'), 0);
        assert_eq!(class_of(b' '), 1);
        assert_eq!(class_of(b'a'), 53);
        assert_eq!(class_of(b'}'), 79);
        // Outside the vocabulary: the space.
        assert_eq!(class_of(b'|'), 1);
        assert_eq!(class_of(0xC3), 1);
        for (i, &c) in VOCAB.iter().enumerate() {
            assert_eq!(class_of(c) as usize, i);
            assert_eq!(char_of(i as u8), c as char);
        }
    }

    #[test]
    fn speeches_join_per_role_in_order_of_appearance() {
        let roles =
            read_roles(&tsv(&[("p", "A", "ab"), ("p", "B", "x"), ("p", "A", "cd"), ("q", "A", "e")])[..]).unwrap();
        let names: Vec<_> = roles.iter().map(|r| (r.play.as_str(), r.role.as_str())).collect();
        assert_eq!(names, [("p", "A"), ("p", "B"), ("q", "A")]);
        let text: String = roles[0].text.iter().map(|&c| char_of(c)).collect();
        assert_eq!(text, "ab cd");
    }

    #[test]
    fn windows_split_in_text_order_without_overlap() {
        // A role of 80 + 200 characters: 200 windows, 160 train, 40 test.
        let text: String = (0..280).map(|i| (b'a' + (i * 7 % 26) as u8) as char).collect();
        let short: String = "z".repeat(SEQ_LEN + MIN_WINDOWS - 1);
        let d = windows(read_roles(&tsv(&[("p", "A", &text), ("p", "Short", &short)])[..]).unwrap());
        assert_eq!(d.roles.len(), 1, "a role under MIN_WINDOWS is dropped");
        assert_eq!(d.data.train.len(), 160);
        assert_eq!(d.data.test.len(), 40);
        assert!(d.data.natural.as_ref().unwrap().iter().all(|&r| r == 0));
        // Example i: the 80 characters before position 80 + i, then that character.
        let t = &d.data.train;
        assert_eq!(t.image(3), &text.as_bytes()[3..83].iter().map(|&c| class_of(c)).collect::<Vec<_>>()[..]);
        assert_eq!(t.labels[3], class_of(text.as_bytes()[83]));
        // The first test target is position 240, just after the last training target.
        let first_test = d.data.test.image(0);
        assert_eq!(first_test[0], class_of(text.as_bytes()[160]));
        assert_eq!(d.data.test.labels[0], class_of(text.as_bytes()[240]));
        assert_eq!(*d.data.test.labels.last().unwrap(), class_of(text.as_bytes()[279]));
        assert_eq!((t.rows, t.cols, t.num_classes), (1, SEQ_LEN, 80));
    }

    #[test]
    fn malformed_speeches_are_refused_with_a_reason() {
        assert!(read_roles(&b""[..]).unwrap_err().contains("empty"));
        assert!(read_roles(&b"name\tvalue\n"[..]).unwrap_err().contains("header"));
        let err = read_roles(&b"play\trole\ttext\nonly two\tfields\n"[..]).unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(read_roles(&b"play\trole\ttext\np\tr\t\xff\xfe\n"[..]).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn the_embedded_sample_has_roles_of_two_plays() {
        let d = embedded_sample().unwrap();
        assert!(d.roles.len() >= 10, "{} roles", d.roles.len());
        let plays: std::collections::BTreeSet<_> = d.roles.iter().map(|r| r.play.as_str()).collect();
        assert_eq!(plays.len(), 2);
        assert_eq!(d.data.natural.as_ref().unwrap().len(), d.data.train.len());
        assert!(d.data.test.len() * 3 < d.data.train.len());
    }
}
