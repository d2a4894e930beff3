//! The word lists the domains draw from, laid out by hand (rustfmt would put one word per
//! line).

pub const NAMES: &[&str] = &[
    "Anna", "Tom", "Maria", "Ben", "Clara", "Hugo", "Lena", "Omar", "Iris", "Felix", "Nora",
    "Paul", "Rosa", "Sam", "Vera", "Jonas", "Mira", "Leo", "Ada", "Eli", "Greta", "Ivan",
    "Julia", "Karl", "Lucy", "Max", "Nina", "Oscar", "Ruth", "Theo",
];
pub const AGENTS: &[&str] = &[
    "farmer", "teacher", "child", "merchant", "sailor", "doctor", "painter", "soldier",
    "baker", "traveler", "king", "queen", "student", "scholar", "fisherman", "woman", "man",
    "guard", "poet", "miner", "hunter", "nurse", "judge", "tailor", "monk", "shepherd",
    "singer", "pilot", "clerk", "neighbor", "fox", "dog", "horse", "owl", "cat", "wolf",
    "goose", "mouse", "sheep", "donkey",
];
pub const THINGS: &[&str] = &[
    "book", "letter", "bridge", "garden", "lamp", "loaf", "map", "key", "song", "story",
    "boat", "box", "basket", "coat", "window", "door", "wall", "fence", "ladder", "candle",
    "clock", "bell", "cup", "bottle", "rope", "hat", "ring", "coin", "stone", "tree",
    "flower", "road", "wagon", "barrel", "chair", "table", "bench", "blanket", "mirror",
    "painting", "drum", "flute", "kettle", "knife", "spoon", "bowl", "shoe", "glove", "shirt",
    "scarf", "feather", "shell", "leaf", "branch", "apple", "pear", "cherry", "potato",
    "cake", "pie", "fire", "roof", "gate", "path", "nest", "seed", "jar", "brush", "pen",
    "note", "parcel", "ticket", "compass", "lantern", "anchor", "sail", "net", "shelf",
];
pub const IRREGULAR_PLURALS: &[(&str, &str)] = &[
    ("child", "children"), ("goose", "geese"), ("mouse", "mice"), ("sheep", "sheep"),
    ("wolf", "wolves"), ("knife", "knives"), ("leaf", "leaves"), ("loaf", "loaves"),
    ("shelf", "shelves"),
];
pub const ADJECTIVES: &[&str] = &[
    "old", "young", "small", "large", "quiet", "bright", "dark", "green", "red", "blue",
    "golden", "silver", "heavy", "light", "ancient", "careful", "gentle", "brave", "tired",
    "happy", "sad", "clever", "strange", "narrow", "wide", "warm", "cold", "wet", "dry",
    "empty", "broken", "hidden", "famous", "humble", "proud", "patient", "wooden", "round",
    "tall", "soft", "rough", "sweet", "bitter", "lonely", "busy", "lazy", "curious", "silent",
    "noisy", "distant", "simple", "fresh", "faded", "shiny", "dusty", "crooked", "elegant",
    "ordinary", "eager", "anxious", "sleepy", "wild", "rusty",
];
/// (base, past) pairs.
pub type Verb = (&'static str, &'static str);
pub const TRANSITIVE: &[Verb] = &[
    ("find", "found"), ("carry", "carried"), ("watch", "watched"), ("build", "built"),
    ("paint", "painted"), ("follow", "followed"), ("visit", "visited"), ("open", "opened"),
    ("remember", "remembered"), ("repair", "repaired"), ("sell", "sold"), ("buy", "bought"),
    ("read", "read"), ("write", "wrote"), ("bring", "brought"), ("hide", "hid"),
    ("lose", "lost"), ("keep", "kept"), ("clean", "cleaned"), ("move", "moved"),
    ("lift", "lifted"), ("count", "counted"), ("draw", "drew"), ("mend", "mended"),
    ("wash", "washed"), ("fix", "fixed"), ("catch", "caught"), ("throw", "threw"),
    ("borrow", "borrowed"), ("share", "shared"), ("guard", "guarded"), ("study", "studied"),
    ("admire", "admired"), ("forget", "forgot"), ("notice", "noticed"), ("pack", "packed"),
    ("push", "pushed"), ("pull", "pulled"), ("touch", "touched"), ("examine", "examined"),
    ("have", "had"),
];
pub const INTRANSITIVE: &[Verb] = &[
    ("sleep", "slept"), ("laugh", "laughed"), ("wait", "waited"), ("sing", "sang"),
    ("run", "ran"), ("rest", "rested"), ("wander", "wandered"), ("smile", "smiled"),
    ("listen", "listened"), ("work", "worked"), ("travel", "traveled"), ("hurry", "hurried"),
    ("arrive", "arrived"), ("stay", "stayed"), ("dance", "danced"), ("whisper", "whispered"),
    ("shout", "shouted"), ("pray", "prayed"), ("swim", "swam"), ("climb", "climbed"),
    ("sit", "sat"), ("go", "went"), ("return", "returned"), ("dream", "dreamed"),
    ("cry", "cried"),
];
pub const ADVERBS: &[&str] = &[
    "quietly", "slowly", "quickly", "carefully", "happily", "gently", "proudly", "nervously",
    "patiently", "eagerly", "silently", "loudly", "calmly", "boldly", "sadly", "again",
    "together", "all day", "every evening",
];
pub const PREPOSITIONS: &[&str] = &[
    "in", "near", "behind", "beside", "across", "under", "above", "along", "outside",
    "inside", "beyond",
];
pub const PLACES: &[&str] = &[
    "village", "market", "harbor", "forest", "valley", "castle", "church", "mill", "square",
    "kitchen", "library", "school", "meadow", "hill", "station", "cottage", "inn", "orchard",
    "bakery", "workshop", "lake", "shore", "island", "city", "farm", "barn", "cave",
    "tavern", "mountain", "river",
];
pub const CONNECTIVES: &[&str] = &[
    "However", "Meanwhile", "Later", "At first", "In the end", "After that", "Soon", "Then",
    "Every morning", "That evening", "For a while", "Because of this", "Once", "Still",
    "Of course",
];
pub const SUBORDINATORS: &[&str] = &[
    "When", "Because", "While", "Although", "Before", "After", "As soon as", "Since",
];
pub const SINGULAR_DETS: &[&str] = &["the", "the", "a", "this", "that", "every", "one"];
pub const PLURAL_DETS: &[&str] = &["the", "some", "many", "these", "two", "three", "several"];

pub const ITEMS: &[&str] = &[
    "apple", "pencil", "marble", "sticker", "book", "cookie", "coin", "card", "stamp",
    "shell", "egg", "orange", "balloon", "flower", "toy car", "button", "candle", "ribbon",
];
pub const CONTAINERS: &[&str] = &["box", "bag", "basket", "jar", "crate", "tray", "pack"];
/// (place, counted noun, what some percentage of them do).
pub const GROUPS: &[(&str, &str, &str)] = &[
    ("A school", "students", "walk to school"), ("A farm", "animals", "are sheep"),
    ("A library", "books", "are novels"), ("A bakery", "rolls", "are sold before noon"),
    ("A town", "houses", "have a garden"), ("A shop", "shirts", "are blue"),
];

/// Nouns whose values are numbers, and nouns whose values are strings.
pub const NUMERIC_NOUNS: &[&str] = &[
    "score", "price", "value", "weight", "reading", "sample", "payment", "point", "amount",
    "distance", "duration", "height", "age", "salary", "temperature", "fee",
];
pub const TEXT_NOUNS: &[&str] = &[
    "word", "tag", "label", "title", "city", "color", "token", "email", "path", "line",
];
pub const WORDS: &[&str] = &[
    "red", "green", "blue", "apple", "river", "stone", "cloud", "tiger", "paper", "lemon",
];
pub const KINDS: &[&str] = &["Tracker", "Store", "Log", "Buffer", "Ledger", "Collection"];
pub const OWNERS: &[&str] = &["team", "user", "project", "shop", "sensor", "account"];
/// Trades, home towns and animals of the long stories' casts.
pub const TRADES: &[&str] = &[
    "farmer", "teacher", "merchant", "sailor", "doctor", "painter", "soldier", "baker",
    "scholar", "fisherman", "guard", "poet", "miner", "hunter", "nurse", "judge", "tailor",
    "shepherd", "singer", "pilot", "clerk", "carpenter", "weaver", "potter", "smith",
    "gardener", "cook", "builder", "astronomer", "mapmaker",
];
pub const TOWNS: &[&str] = &[
    "Greyhollow", "Eastmoor", "Millbrook", "Stonebridge", "Ashford", "Redwater", "Oakridge",
    "Saltmarsh", "Windmere", "Brackenfield", "Coldharbor", "Dunmore", "Elmstead", "Fairhaven",
    "Glenrock", "Highcliff", "Ironwood", "Kettleby", "Larkspur", "Mossbank", "Northwick",
    "Pinecrest", "Ravensgate", "Silverton", "Thornbury", "Westfold",
];
pub const ANIMALS: &[&str] = &[
    "dog", "cat", "horse", "owl", "goose", "donkey", "goat", "parrot", "raven", "pony",
];
pub const ANIMAL_NAMES: &[&str] = &[
    "Pepper", "Mist", "Biscuit", "Clover", "Ember", "Juniper", "Pebble", "Rusty", "Sage",
    "Thistle", "Willow", "Bramble", "Copper", "Dusk", "Fennel", "Hazel", "Maple", "Nutmeg",
    "Olive", "Puddle", "Quill", "Sorrel", "Tansy", "Wren",
];
pub const COMMENTS: &[&str] = &[
    "# Helper used by the report code.", "# Keep this simple; the lists are small.",
    "# Inputs are assumed to be valid.", "# See the tests for examples.",
    "# This runs once per request.",
];
