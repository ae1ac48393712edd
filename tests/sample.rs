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
    fn top_candidates_are_the_sorted_candidates_first_k(l in logits(), k in 0usize..70) {
        // The reference: every id sorted by logit, highest first, ties to the lower id.
        let mut want: Vec<u32> = (0..l.len() as u32).collect();
        want.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        if k > 0 {
            want.truncate(k);
        }
        let got: Vec<u32> = sample::top_candidates(&l, k).iter().map(|x| x.id).collect();
        prop_assert_eq!(got, want);
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

/// Logits with numeric extremes: the largest finite values, masked (`-inf`) and NaN entries,
/// and exact ties.
fn extreme_logits() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            4 => -20.0f32..20.0,
            1 => Just(f32::NEG_INFINITY),
            1 => Just(f32::NAN),
            1 => Just(f32::MAX),
            1 => Just(-f32::MAX),
            1 => Just(1e30f32),
            1 => Just(0.0f32),
        ],
        1..40,
    )
}

/// Positive values from the smallest subnormal to the largest finite float.
fn extreme_positive() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::from_bits(1)),
        Just(f32::MIN_POSITIVE),
        Just(1e-38f32),
        Just(1e-10f32),
        1e-3f32..10.0,
        Just(1e10f32),
        Just(1e38f32),
        Just(f32::MAX),
    ]
}

/// Finite values of either sign, extremes included.
fn extreme_finite() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        -5.0f32..5.0,
        Just(f32::MAX),
        Just(-f32::MAX),
        Just(1e30f32),
        Just(-1e30f32),
    ]
}

proptest! {
    /// Whatever the settings, the draw comes from the candidates the filters keep and has a
    /// positive weight `exp((l - l_max) / T)` under the intended distribution: never a masked
    /// token while another remains, never a token that the temperature weighs at 0.
    #[test]
    fn every_draw_has_a_positive_probability_under_extreme_settings(
        l in extreme_logits(),
        temperature in extreme_positive(),
        top_k in 0usize..45,
        top_p in prop_oneof![Just(1.0f32), Just(f32::from_bits(1)), 1e-6f32..=1.0],
        min_p in prop_oneof![Just(0.0f32), Just(1.0f32), 0.0f32..=1.0],
        repeat_penalty in extreme_positive(),
        frequency_penalty in extreme_finite(),
        presence_penalty in extreme_finite(),
        recent in prop::collection::vec(0u32..40, 0..8),
        seed in any::<u64>(),
    ) {
        let cfg = GenerationConfig {
            temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n: 64,
            frequency_penalty, presence_penalty, seed,
        };
        let mut s = Sampler::new(cfg.clone()).unwrap();
        let mut logits = l.clone();
        let drawn = s.sample(&mut logits, &recent);

        // The same chain through the public steps, to know what the filters keep.
        let mut penalised = l.clone();
        sample::apply_penalties(&mut penalised, &recent, &cfg);
        prop_assert!(penalised.iter().all(|v| !v.is_infinite() || *v == f32::NEG_INFINITY || v.is_nan()),
            "penalties overflowed: {:?}", penalised);
        let mut c = sample::sorted_candidates(&penalised);
        sample::top_k(&mut c, top_k);
        if top_p < 1.0 { sample::top_p(&mut c, top_p); }
        if min_p > 0.0 { sample::min_p(&mut c, min_p); }
        let kept = c.iter().find(|x| x.id == drawn);
        prop_assert!(kept.is_some(), "drew {} outside the kept {:?}", drawn, c);
        let max = c.iter().map(|x| x.logit).fold(f32::NEG_INFINITY, f32::max);
        let l_drawn = kept.unwrap().logit;
        if max.is_finite() {
            let weight = ((l_drawn as f64 - max as f64) / temperature as f64).exp();
            prop_assert!(weight > 0.0, "drew {} (logit {}) at weight 0; max {}, T {}", drawn, l_drawn, max, temperature);
        } else {
            // Every kept logit is -inf: each is equally (un)likely.
            prop_assert_eq!(l_drawn, max);
        }
    }

    /// The softmax never yields NaN and always sums to 1, at any temperature.
    #[test]
    fn softmax_is_a_distribution_at_any_temperature(l in extreme_logits(), t in extreme_positive()) {
        let mut c = sample::sorted_candidates(&l);
        sample::softmax_with_temperature(&mut c, t);
        let sum: f64 = c.iter().map(|x| x.p as f64).sum();
        prop_assert!(c.iter().all(|x| x.p.is_finite() && x.p >= 0.0), "{:?}", c);
        prop_assert!((sum - 1.0).abs() < 1e-5, "sum {}", sum);
    }
}

#[test]
fn a_tiny_temperature_is_greedy_for_every_seed() {
    // Logits like a model's: one clear maximum, one very low outlier.
    let mut logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.01)
        .collect();
    logits[421] = 12.5;
    logits[999] = -30.0;
    for temperature in [1e-38f32, f32::from_bits(1), 1e-20] {
        for seed in 0..50 {
            let mut s = Sampler::new(GenerationConfig {
                temperature,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed,
                ..GenerationConfig::default()
            })
            .unwrap();
            assert_eq!(
                s.sample(&mut logits.clone(), &[]),
                421,
                "T {temperature}, seed {seed}"
            );
        }
    }
}

#[test]
fn masked_tokens_are_never_drawn_and_equal_logits_are_uniform() {
    let cfg = |seed| GenerationConfig {
        temperature: 1e38,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed,
        ..GenerationConfig::default()
    };
    let mut masked = vec![f32::NEG_INFINITY; 8];
    masked[3] = -5.0;
    masked[6] = 7.0;
    let mut s = Sampler::new(cfg(3)).unwrap();
    let mut counts = [0u32; 8];
    for _ in 0..4000 {
        counts[s.sample(&mut masked.clone(), &[]) as usize] += 1;
    }
    // A huge temperature flattens the two unmasked tokens to even odds; the rest never come.
    assert_eq!(
        counts.iter().sum::<u32>(),
        counts[3] + counts[6],
        "{counts:?}"
    );
    assert!(counts[3] > 1800 && counts[6] > 1800, "{counts:?}");

    let mut s = Sampler::new(cfg(4)).unwrap();
    let mut counts = [0u32; 4];
    for _ in 0..4000 {
        counts[s.sample(&mut [2.5f32; 4], &[]) as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c > 900), "{counts:?}");
}

#[test]
fn extreme_penalties_saturate_instead_of_overflowing() {
    let cfg = GenerationConfig {
        repeat_penalty: f32::from_bits(1),
        frequency_penalty: -f32::MAX,
        presence_penalty: 0.0,
        ..GenerationConfig::greedy()
    };
    let mut l = vec![3.0f32, -2.0, f32::NEG_INFINITY, 1.0];
    sample::apply_penalties(&mut l, &[0, 1, 2, 0], &cfg);
    // 3 / 1e-45 and 3 + 2·MAX saturate at MAX; -2 · 1e-45 + MAX saturates too; masked stays
    // masked; token 3 was not recent.
    assert_eq!(l, vec![f32::MAX, f32::MAX, f32::NEG_INFINITY, 1.0]);
}
