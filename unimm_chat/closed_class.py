"""English closed-class words: the function words a caption may start with, as data.

The template generator splices captions, rationales and answers into its own sentences ("I also notice {np}.").
A capital at the start of the spliced text is only lowered when the first word is one of these: they are never
names, so "A living room" -> "a living room" is safe, while a proper noun ("Obama"), an acronym ("NASA") or any
other word keeps its case. Modal and auxiliary verbs are left out on purpose ("Will", "May" and "Can" can be
names), and so is "I", which is always written in capitals.
"""

from __future__ import annotations

ARTICLES = ("a", "an", "the")
# Cardinal and ordinal numerals, and number-like quantities ("Dozens of birds on a wire").
NUMERALS = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen",
    "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty",
    "sixty", "seventy", "eighty", "ninety", "hundred", "hundreds", "thousand", "thousands", "dozen", "dozens",
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "last",
)  # fmt: skip
# Personal, possessive, demonstrative, indefinite, relative and interrogative pronouns and possessive determiners.
PRONOUNS = (
    "he", "she", "it", "we", "you", "they", "him", "her", "us", "them", "me", "my", "mine", "his", "hers", "its",
    "our", "ours", "your", "yours", "their", "theirs", "this", "that", "these", "those", "someone", "somebody",
    "something", "anyone", "anybody", "anything", "everyone", "everybody", "everything", "nobody", "nothing",
    "who", "whom", "whose", "what", "which", "there", "here",
)  # fmt: skip
# Determiners and quantifiers.
DETERMINERS = (
    "some", "any", "no", "every", "each", "either", "neither", "all", "both", "half", "several", "many", "much",
    "more", "most", "few", "fewer", "less", "least", "lots", "plenty", "another", "other", "such", "enough",
    "various", "numerous",
)  # fmt: skip
PREPOSITIONS = (
    "in", "on", "at", "by", "for", "with", "without", "from", "to", "of", "off", "near", "next", "beside", "besides",
    "behind", "between", "among", "amid", "inside", "outside", "above", "below", "under", "underneath", "beneath",
    "over", "across", "along", "alongside", "around", "through", "into", "onto", "up", "down", "after", "before",
    "during", "against", "atop", "beyond", "toward", "towards", "upon", "within", "past", "via", "like", "unlike",
)  # fmt: skip
CONJUNCTIONS = (
    "and", "or", "but", "nor", "so", "yet", "while", "as", "because", "although", "though", "when", "where",
    "whereas", "if", "since", "until", "unless",
)  # fmt: skip

CLOSED_CLASS_WORDS = frozenset(ARTICLES + NUMERALS + PRONOUNS + DETERMINERS + PREPOSITIONS + CONJUNCTIONS)
