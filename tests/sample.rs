//! The sampler chain: properties of each filter, penalties against hand-computed values,
//! and a chi-square test that temperature-1 sampling follows the distribution.

use chord::sample::{self, GenerationConfig, Sampler};
use proptest::prelude::*;

/// Logits drawn from a few values, so ties are common.
fn logits() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop::sample::select(vec![-3.0f32, -1.0, 0.0, 0.5, 0.5, 1.0, 2.0, 4.0]),
        1..60,
    )
}

proptest! {
    #[test]
    fn top_k_keeps_exactly_the_k_largest_ties_to_the_lower_id(l in logits(), k in 0usize..70) {
        let mut c = sample::sorted_candidates(&l);
        sample::top_k(&mut c, k);
        let expected = if k == 0 { l.len() } else { k.min(l.len()) };
        prop_assert_eq!(c.len(), expected);
        let kept: Vec<u32> = c.iter().map(|x| x.id).collect();
        for (i, &v) in l.iter().enumerate() {
            let i = i as u32;
            if kept.contains(&i) {
                continue;
            }
            // Every dropped token is below every kept one, or equal and of a higher id.
            for x in &c {
                prop_assert!(v < x.logit || (v == x.logit && i > x.id), "dropped {i} ({v}) beside kept {} ({})", x.id, x.logit);
            }
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p(l in logits(), p in 0.01f32..=1.0) {
        let mut all = sample::sorted_candidates(&l);
        sample::softmax(&mut all);
        let mut c = all.clone();
        sample::top_p(&mut c, p);
        let mass = |n: usize| all[..n].iter().map(|x| x.p as f64).sum::<f64>();
        prop_assert!(!c.is_empty());
        prop_assert_eq!(c.iter().map(|x| x.id).collect::<Vec<_>>(), all[..c.len()].iter().map(|x| x.id).collect::<Vec<_>>());
        // Reaches p (up to float rounding when p is 1), and one fewer would not.
        prop_assert!(mass(c.len()) >= p as f64 - 1e-6 || c.len() == all.len());
        if c.len() > 1 {
            prop_assert!(mass(c.len() - 1) < p as f64);
        }
    }

    #[test]
    fn min_p_keeps_what_is_at_least_p_times_the_top(l in logits(), m in 0.0f32..=1.0) {
        let mut all = sample::sorted_candidates(&l);
        sample::softmax(&mut all);
        let mut c = all.clone();
        sample::min_p(&mut c, m);
        let top = all[0].p;
        let want: Vec<u32> = all.iter().filter(|x| x.p >= top * m).map(|x| x.id).collect();
        prop_assert_eq!(c.iter().map(|x| x.id).collect::<Vec<_>>(), want);
    }
}

#[test]
fn penalties_match_hand_computed_values() {
    let cfg = GenerationConfig {
        repeat_penalty: 2.0,
        repeat_last_n: 3,
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..GenerationConfig::greedy()
    };
    let mut l = vec![4.0f32, -2.0, 1.0, 3.0];
    // Window of the last 3: tokens 1, 0, 1 (the first 3 is outside it).
    sample::apply_penalties(&mut l, &[3, 1, 0, 1], &cfg);
    // Token 0: 4 / 2 - 0.5·1 - 0.25 = 1.25. Token 1: -2·2 - 0.5·2 - 0.25 = -5.25.
    assert_eq!(l, vec![1.25, -5.25, 1.0, 3.0]);
}

/// Pearson's chi-square over 20,000 draws at temperature 1 from a fixed distribution, and
/// the same statistic for draws at temperature 2, which must fail it.
#[test]
fn temperature_1_sampling_follows_the_distribution() {
    let probs = [0.1f64, 0.2, 0.3, 0.25, 0.15];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let chi2 = |temperature: f32| {
        let cfg = GenerationConfig {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..GenerationConfig::default()
        };
        let mut s = Sampler::new(cfg).unwrap();
        let n = 20_000;
        let mut counts = [0u32; 5];
        for _ in 0..n {
            counts[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        counts
            .iter()
            .zip(probs)
            .map(|(&o, p)| (o as f64 - n as f64 * p).powi(2) / (n as f64 * p))
            .sum::<f64>()
    };
    // Critical value of chi-square with 4 degrees of freedom at p = 0.001.
    let critical = 18.47;
    let at_1 = chi2(1.0);
    assert!(at_1 < critical, "chi-square {at_1} at temperature 1");
    assert!(
        chi2(2.0) > critical,
        "temperature 2 must not look like the distribution"
    );
}

#[test]
fn the_same_seed_gives_the_same_stream_and_another_seed_another() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let run = |seed: u64| {
        let mut s = Sampler::new(GenerationConfig {
            seed,
            ..GenerationConfig::default()
        })
        .unwrap();
        (0..40)
            .map(|_| s.sample(&mut logits.clone(), &[]))
            .collect::<Vec<u32>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn out_of_range_settings_are_refused_with_the_field_named() {
    let bad = [
        (
            GenerationConfig {
                temperature: -0.1,
                ..Default::default()
            },
            "temperature",
        ),
        (
            GenerationConfig {
                top_p: 0.0,
                ..Default::default()
            },
            "top_p",
        ),
        (
            GenerationConfig {
                top_p: 1.5,
                ..Default::default()
            },
            "top_p",
        ),
        (
            GenerationConfig {
                min_p: -1.0,
                ..Default::default()
            },
            "min_p",
        ),
        (
            GenerationConfig {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            "repeat_penalty",
        ),
        (
            GenerationConfig {
                temperature: f32::NAN,
                ..Default::default()
            },
            "temperature",
        ),
    ];
    for (cfg, field) in bad {
        let err = Sampler::new(cfg).err().unwrap();
        assert!(err.starts_with(field), "{err}");
    }
}
