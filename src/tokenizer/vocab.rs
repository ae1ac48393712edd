//! The vocabulary: every token's text, packed, and an index from text to id.

use std::hash::BuildHasher as _;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use crate::gguf::Strings;

/// Token texts by id, and ids by text.
///
/// The index holds ids alone and compares through the texts, so a vocabulary costs two
/// allocations for its texts and one for its index, not a `String` per token twice over.
pub(super) struct Vocab {
    texts: Strings,
    index: HashTable<u32>,
    hasher: RandomState,
}

impl Vocab {
    /// The vocabulary of `texts`, token `i` being text `i`. A text listed twice maps to its
    /// last id, as llama.cpp's `token_to_id` map ends up.
    pub(super) fn new(texts: Strings) -> Vocab {
        let hasher = RandomState::default();
        let mut index = HashTable::with_capacity(texts.len());
        for (id, text) in texts.iter().enumerate() {
            let entry = index.entry(
                hasher.hash_one(text),
                |&other: &u32| &texts[other as usize] == text,
                |&other: &u32| hasher.hash_one(&texts[other as usize]),
            );
            match entry {
                Entry::Occupied(mut e) => *e.get_mut() = id as u32,
                Entry::Vacant(e) => {
                    e.insert(id as u32);
                }
            }
        }
        Vocab {
            texts,
            index,
            hasher,
        }
    }

    /// Number of tokens.
    pub(super) fn len(&self) -> usize {
        self.texts.len()
    }

    /// Token `id`'s text.
    pub(super) fn text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize)
    }

    /// The id of the token whose text is `text`.
    pub(super) fn id(&self, text: &str) -> Option<u32> {
        self.index
            .find(self.hasher.hash_one(text), |&id| {
                &self.texts[id as usize] == text
            })
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_by_text_and_text_by_id_with_the_last_of_a_duplicate() {
        let v = Vocab::new(["a", "bc", "", "a", "d"].into_iter().collect());
        assert_eq!(v.len(), 5);
        assert_eq!(v.id("a"), Some(3));
        assert_eq!(v.id("bc"), Some(1));
        assert_eq!(v.id(""), Some(2));
        assert_eq!(v.id("d"), Some(4));
        assert_eq!(v.id("b"), None);
        assert_eq!(v.text(1), Some("bc"));
        assert_eq!(v.text(0), Some("a"));
        assert_eq!(v.text(5), None);
    }
}
