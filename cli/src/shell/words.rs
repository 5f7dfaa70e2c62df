//! Splitting a shell line into words: whitespace separates, '…' and "…" quote, a backslash
//! escapes the next character (outside single quotes).

pub fn split(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('\''), c) => word.push(c),
            (_, '\\') => match chars.next() {
                Some(next) => {
                    word.push(next);
                    in_word = true;
                }
                None => return Err("the line ends in a backslash".into()),
            },
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unclosed {q} quote"));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(split("  a  b ").unwrap(), ["a", "b"]);
        assert_eq!(
            split(r#"embed "two words" 'it''s' a\ b "#).unwrap(),
            ["embed", "two words", "its", "a b"]
        );
        assert_eq!(split(r#"x "" y"#).unwrap(), ["x", "", "y"]);
        assert!(split("say 'oops").unwrap_err().contains("unclosed"));
        assert!(split("end\\").is_err());
    }
}
