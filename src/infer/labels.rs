//! The 18 genres and the rule that turns scores into a predicted set. Serving,
//! evaluation and training all decide through `decide`, so they cannot disagree.

/// The 18 genres, in the order every model output uses (posters-v1 `genres.txt`).
pub const GENRES: [&str; 18] = [
    "Action",
    "Adventure",
    "Animation",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Family",
    "Fantasy",
    "History",
    "Horror",
    "Music",
    "Mystery",
    "Romance",
    "Science Fiction",
    "Thriller",
    "War",
    "Western",
];

/// The genres as owned strings, in model output order.
pub fn labels() -> Vec<String> {
    GENRES.iter().map(|s| s.to_string()).collect()
}

/// The predicted set of one row: every genre at or over its threshold, or, if none is,
/// the one closest to its threshold (a poster always has some genre).
pub fn decide(scores: &[f32], thresholds: &[f32]) -> Vec<u8> {
    let mut out: Vec<u8> = scores
        .iter()
        .zip(thresholds)
        .map(|(s, t)| u8::from(s >= t))
        .collect();
    if !out.contains(&1) {
        let best = scores
            .iter()
            .zip(thresholds)
            .enumerate()
            .max_by(|a, b| (a.1.0 / a.1.1).total_cmp(&(b.1.0 / b.1.1)))
            .map(|(j, _)| j);
        if let Some(j) = best {
            out[j] = 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decide_never_returns_an_empty_set() {
        assert_eq!(decide(&[0.1, 0.3, 0.2], &[0.5, 0.5, 0.25]), vec![0, 0, 1]);
        assert_eq!(decide(&[0.9, 0.3], &[0.5, 0.5]), vec![1, 0]);
    }
}
