"""The words the template writer knows, and the English helpers it edits captions with.

Word lists (nouns it can swap, colours, materials, people and animals, food, scenes,
styles, seasons, weather, times of day), the regexes built from them once at import,
and small text surgery (plurals, ``a``/``an``, case matching, inserting or replacing a
word and fixing the article before it). Kept apart from the grammar in
``template.py`` so each file reads on its own: this one is data, that one is rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_COLOURS = ("red", "blue", "green", "yellow", "purple", "pink", "orange", "black", "white",
            "golden", "silver", "brown", "gray", "grey", "turquoise")
_NEW_COLOURS = ("red", "blue", "green", "yellow", "purple", "pink", "orange", "golden", "silver", "turquoise")
_MATERIALS = {"wooden": "wood", "metal": "metal", "metallic": "metal", "glass": "glass", "stone": "stone",
              "marble": "marble", "plastic": "plastic", "ceramic": "ceramic", "bronze": "bronze",
              "brick": "brick", "steel": "steel", "iron": "iron", "crystal": "crystal",
              "paper": "paper"}
_NEW_MATERIALS = ("wooden", "metal", "glass", "stone", "marble", "bronze", "crystal")

_SWAPS: dict[str, tuple[str, ...]] = {
    "man": ("woman", "robot", "astronaut"), "woman": ("man", "robot", "queen"),
    "boy": ("girl", "robot"), "girl": ("boy", "robot"), "person": ("robot", "astronaut"),
    "cat": ("dog", "tiger", "fox"), "dog": ("cat", "wolf", "fox"), "horse": ("zebra", "unicorn", "camel"),
    "cow": ("horse", "buffalo"), "bird": ("parrot", "owl", "eagle"), "duck": ("swan", "goose"),
    "lion": ("tiger", "bear"), "tiger": ("lion", "leopard"), "bear": ("panda", "lion"),
    "elephant": ("rhinoceros", "mammoth"), "giraffe": ("zebra", "dinosaur"), "rabbit": ("squirrel", "kitten"),
    "fox": ("wolf", "cat"), "owl": ("eagle", "parrot"), "squirrel": ("rabbit", "chipmunk"),
    "wolf": ("fox", "husky"), "puppy": ("kitten",), "kitten": ("puppy",), "monkey": ("gorilla", "panda"),
    "penguin": ("seal", "polar bear"), "parrot": ("owl", "toucan"), "deer": ("moose", "unicorn"),
    "car": ("bicycle", "truck", "horse carriage"), "bicycle": ("motorcycle", "scooter"),
    "bike": ("motorcycle", "scooter"), "motorcycle": ("bicycle", "scooter"), "bus": ("tram", "train"),
    "truck": ("tractor", "bus"), "boat": ("canoe", "sailboat", "gondola"), "ship": ("pirate ship", "sailboat"),
    "train": ("tram", "bus"), "airplane": ("hot air balloon", "helicopter"), "plane": ("helicopter", "dragon"),
    "tractor": ("truck",), "van": ("truck", "bus"),
    "apple": ("orange", "pear", "peach"), "banana": ("cucumber", "carrot"), "pizza": ("cake", "pie"),
    "cake": ("pizza", "pie"), "burger": ("sandwich", "taco"), "sandwich": ("burger", "taco"),
    "donut": ("bagel", "muffin"), "coffee": ("tea", "hot chocolate"), "tea": ("coffee", "lemonade"),
    "strawberry": ("cherry", "raspberry"), "salad": ("pasta", "soup"), "soup": ("salad", "curry"),
    "pasta": ("salad", "rice"), "cupcake": ("muffin", "donut"), "lemon": ("lime", "orange"),
    "pancake": ("waffle",), "cookie": ("cracker", "muffin"),
    "chair": ("armchair", "stool", "throne"), "table": ("desk",), "sofa": ("bench", "bed"),
    "couch": ("bench", "bed"), "lamp": ("candle", "lantern"), "book": ("laptop", "newspaper"),
    "cup": ("mug", "bowl"), "mug": ("cup", "teapot"), "vase": ("bowl", "jar"), "bottle": ("jar", "vase"),
    "clock": ("mirror", "painting"), "hat": ("crown", "helmet"), "umbrella": ("parasol", "kite"),
    "guitar": ("violin", "ukulele"), "piano": ("harp", "organ"), "house": ("castle", "cabin", "lighthouse"),
    "castle": ("palace", "cathedral"), "tree": ("palm tree", "cherry tree"), "flower": ("rose", "sunflower", "tulip"),
    "rose": ("tulip", "sunflower"), "mountain": ("volcano",), "church": ("castle", "mosque"),
    "tower": ("lighthouse", "pagoda"), "window": ("door", "mirror"), "bed": ("hammock", "sofa"),
}

_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "person": "people",
                      "wolf": "wolves", "deer": "deer", "sheep": "sheep", "fish": "fish", "mouse": "mice",
                      "knife": "knives", "leaf": "leaves", "shelf": "shelves", "scarf": "scarves",
                      "moose": "moose", "buffalo": "buffaloes", "tomato": "tomatoes", "potato": "potatoes",
                      "rhinoceros": "rhinoceroses", "volcano": "volcanoes", "hero": "heroes"}

_NOT_A_COLOUR_BEFORE = {"retriever", "hour", "gate", "carpet", "hole", "jeans", "wine", "pepper", "eagle",
                        "bear", "widow", "belt", "dwarf", "giant", "age", "rule", "ratio"}
_COMPOUND_BEFORE = {"teddy", "polar", "sea", "hot", "guinea", "toy"}
_WEARING_ANIMALS = {"cat", "dog", "puppy", "kitten", "horse", "bear", "monkey", "penguin", "rabbit", "fox",
                    "lion", "tiger", "elephant", "giraffe", "cow", "goat", "pig", "panda", "koala", "owl",
                    "parrot", "duck", "frog", "sheep", "zebra", "camel", "wolf", "squirrel", "deer", "turtle"}
_POSSESSIVES = {"its", "his", "her", "their", "my", "our", "your"}
_PEOPLE = {"man", "woman", "boy", "girl", "child", "person", "lady", "gentleman", "chef", "soldier",
           "king", "queen", "baby", "student", "teenager", "farmer", "musician", "dancer", "surfer",
           "skier", "skateboarder", "player", "doctor", "astronaut", "robot"}
_ANIMALS = {"cat", "dog", "horse", "cow", "bird", "duck", "lion", "tiger", "bear", "elephant", "giraffe",
            "rabbit", "fox", "owl", "squirrel", "wolf", "puppy", "kitten", "goat", "monkey", "penguin",
            "parrot", "deer", "zebra", "panda", "pig", "sheep", "frog", "turtle", "camel", "koala"}
_COLOURABLE = {"car", "bicycle", "bike", "motorcycle", "bus", "truck", "boat", "ship", "train", "airplane",
               "plane", "tractor", "van", "chair", "table", "sofa", "couch", "lamp", "cup", "mug", "vase",
               "bottle", "hat", "umbrella", "dress", "shirt", "jacket", "coat", "scarf", "door", "house",
               "bench", "kite", "balloon", "guitar", "teapot", "bowl", "bag", "backpack", "tent", "sweater",
               "flower", "rose", "tulip", "bird", "parrot", "fence", "wall", "roof", "barn", "sky", "bed",
               "pillow", "curtains", "scooter", "helmet", "sneakers", "shoes"}
_MATERIALABLE = {"chair", "table", "bench", "vase", "bowl", "cup", "mug", "statue", "sculpture", "bridge",
                 "door", "house", "box", "spoon", "clock", "bottle", "plate", "boat", "teapot", "lamp",
                 "tower", "fence", "desk", "bed", "shelf", "stool", "throne", "cabin", "guitar", "horse"}
_SWEET = {"cake", "cupcake", "donut", "doughnut", "ice cream", "pancakes", "pancake", "dessert", "pie",
          "cookies", "cookie", "waffles", "waffle", "muffin", "cheesecake", "brownie", "pudding"}
_SAVOURY = {"pizza", "salad", "soup", "burger", "sandwich", "pasta", "noodles", "steak", "sushi",
            "breakfast", "eggs", "bread", "toast", "tacos", "taco", "curry", "rice", "omelette", "spaghetti"}
_OUTDOOR = {"street", "road", "beach", "mountain", "mountains", "field", "fields", "park", "forest", "woods",
            "lake", "river", "city", "garden", "sky", "sea", "ocean", "landscape", "village", "meadow",
            "hill", "hills", "valley", "desert", "bridge", "harbor", "harbour", "countryside", "farm",
            "trail", "path", "waterfall", "island", "coast", "shore", "outside", "outdoors", "yard",
            "square", "town", "skyline", "canyon", "cliff", "cliffs", "castle", "lighthouse", "highway",
            "pier", "dock", "campsite", "grass", "snow", "lawn", "backyard", "alley", "avenue", "sidewalk",
            "stadium", "runway", "bay", "pond", "glacier", "volcano", "jungle", "savanna", "prairie",
            "vineyard", "orchard", "temple", "ruins", "cathedral", "church", "tower", "windmill", "barn"}
_INTERIOR = {"room", "kitchen", "bedroom", "living room", "bathroom", "office", "library", "restaurant",
             "cafe", "café", "hallway", "interior", "studio", "classroom", "fireplace", "bed", "desk",
             "sofa", "couch", "shelf", "bookshelf", "counter", "lobby", "attic", "cellar"}

_STYLE_PREFIX = re.compile(
    r"^(?:(?:a|an|the)\s+)?(?:[\w'-]+\s+){0,3}?"
    r"(?:painting|drawing|sketch|illustration|photo|photograph|picture|image|render|rendering|poster|"
    r"print|portrait|mosaic|engraving|artwork|shot|snapshot|still)\s+of\s+",
    re.IGNORECASE,
)
_STYLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a watercolor painting", ("make it a watercolor painting", "turn it into a watercolor painting")),
    ("an oil painting", ("make it an oil painting", "turn it into an oil painting")),
    ("a pencil sketch", ("make it a pencil sketch", "turn it into a pencil sketch")),
    ("a charcoal drawing", ("make it a charcoal drawing",)),
    ("a mosaic", ("make it a mosaic", "turn it into a mosaic")),
    ("a stained glass window", ("make it a stained glass window",)),
    ("a ukiyo-e woodblock print", ("make it a ukiyo-e print", "turn it into a ukiyo-e woodblock print")),
    ("a pixel art image", ("make it pixel art", "turn it into pixel art")),
    ("a claymation still", ("make it claymation", "turn it into claymation")),
)
_STYLE_SUFFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("in the style of Van Gogh", ("make it look like a Van Gogh painting", "paint it in the style of Van Gogh")),
    ("in anime style", ("make it anime", "make it look like an anime")),
    ("in the style of a Pixar movie", ("make it look like a Pixar movie",)),
)
_SEASONS = ("winter", "autumn", "spring", "summer")
_SEASON_PHRASE = re.compile(r"\b(in|during)\s+(?:the\s+)?(winter|summer|spring|autumn|fall)\b", re.IGNORECASE)
_WEATHER: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("rain", "in the rain", ("make it rain", "make it rainy", "add rain")),
    ("snow", "in the snow", ("make it snow", "add snow", "make it snowy")),
    ("fog", "in thick fog", ("make it foggy", "add fog")),
    ("storm", "during a storm", ("make it stormy", "add a storm")),
)
_WEATHER_PHRASE = re.compile(
    r"\b(in the (?:rain|snow|fog|mist)|in thick fog|on a (?:rainy|snowy|foggy|sunny|cloudy) day|"
    r"during a (?:thunderstorm|storm|snowstorm|blizzard))\b",
    re.IGNORECASE,
)
_TIMES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("night", "at night", ("make it night", "make it nighttime", "make it night time")),
    ("sunset", "at sunset", ("make it sunset", "make it golden hour at sunset")),
    ("dawn", "at dawn", ("make it dawn", "make it early morning at dawn")),
    ("day", "during the day", ("make it daytime", "make it day")),
)
_TIME_PHRASE = re.compile(
    r"\b(at (?:night|sunset|sunrise|dawn|dusk|noon|twilight)|during the day|in the (?:morning|evening)|"
    r"at night time|by night)\b",
    re.IGNORECASE,
)
_WEARABLES: tuple[tuple[str, str], ...] = (
    ("a hat", "hats"), ("sunglasses", "sunglasses"), ("a crown", "crowns"), ("a red scarf", "red scarves"),
    ("a bow tie", "bow ties"), ("a cowboy hat", "cowboy hats"),
)
_SKY_ADDITIONS: tuple[tuple[str, str], ...] = (
    ("a rainbow", "a rainbow in the sky"), ("a hot air balloon", "a hot air balloon in the sky"),
    ("fireworks", "fireworks in the sky"), ("a flock of birds", "a flock of birds in the sky"),
)
_SWEET_ADDITIONS: tuple[tuple[str, str], ...] = (
    ("strawberries", "topped with strawberries"), ("sprinkles", "covered in sprinkles"),
    ("chocolate sauce", "drizzled with chocolate sauce"), ("a candle", "with a lit candle on top"),
)
_SAVOURY_ADDITIONS: tuple[tuple[str, str], ...] = (
    ("basil", "garnished with fresh basil"), ("a fried egg", "topped with a fried egg"),
    ("chili peppers", "with red chili peppers"), ("a slice of lemon", "with a slice of lemon"),
)
_INTERIOR_ADDITIONS: tuple[tuple[str, str], ...] = (
    ("a potted plant", "a potted plant"), ("a sleeping cat", "a sleeping cat"),
    ("a vase of flowers", "a vase of flowers"), ("fairy lights", "fairy lights"),
)
_NP_STOP = {"in", "on", "at", "under", "near", "next", "by", "behind", "beside", "above", "below", "over",
            "from", "of", "for", "to", "while", "who", "that", "which", "is", "are", "was", "were", "and",
            "with", "as", "into", "onto", "through", "across", "along", "against", "during", "the", "a", "an"}
_DETERMINERS = {"a", "an", "the", "some", "two", "three", "four", "five", "several", "many", "his", "her",
                "its", "their", "lots"}
_ING_NOUNS = {"ring", "king", "wing", "thing", "building", "painting", "ceiling", "string", "swing",
              "spring", "pudding", "wedding", "clothing", "earring", "icing", "frosting", "stuffing"}


def _plural(noun: str) -> str:
    *head, last = noun.split(" ")
    if last in _IRREGULAR_PLURALS:
        out = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        out = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        out = last[:-1] + "ies"
    else:
        out = last + "s"
    return " ".join([*head, out])


def _article(word: str) -> str:
    w = word.lower()
    if w.startswith(("uni", "use", "usu", "eu", "one", "ukulele", "ufo")):
        return "a"
    if w.startswith(("hour", "honest", "honou", "heir")):
        return "an"
    return "an" if w[:1] in "aeiou" else "a"


def _the(noun_phrase: str) -> str:
    return f"the {noun_phrase}"


def _with_article(noun: str, plural: bool) -> str:
    return noun if plural else f"{_article(noun)} {noun}"


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _word_regex(words: Sequence[str]) -> re.Pattern[str]:
    alts = sorted(set(words), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alts) + r")\b", re.IGNORECASE)


def _nouns_with_plurals(words: set[str]) -> dict[str, tuple[str, bool]]:
    """Surface form → (singular, is_plural) for a set of singular nouns."""
    out: dict[str, tuple[str, bool]] = {}
    for w in words:
        out[w] = (w, False)
        p = _plural(w)
        if p != w:
            out[p] = (w, True)
    return out


_SWAP_FORMS = _nouns_with_plurals(set(_SWAPS))
_SWAP_RE = _word_regex(list(_SWAP_FORMS))
_PEOPLE_ANIMAL_FORMS = _nouns_with_plurals(_PEOPLE | _ANIMALS)
_PEOPLE_ANIMAL_RE = _word_regex(list(_PEOPLE_ANIMAL_FORMS))
_WEARER_FORMS = _nouns_with_plurals(_PEOPLE | _WEARING_ANIMALS)
_WEARER_RE = _word_regex(list(_WEARER_FORMS))
_COLOURABLE_FORMS = _nouns_with_plurals(_COLOURABLE)
_COLOURABLE_RE = _word_regex(list(_COLOURABLE_FORMS))
_MATERIALABLE_FORMS = _nouns_with_plurals(_MATERIALABLE)
_MATERIALABLE_RE = _word_regex(list(_MATERIALABLE_FORMS))
_COLOUR_RE = _word_regex(_COLOURS)
_MATERIAL_RE = _word_regex(list(_MATERIALS))
_SWEET_RE = _word_regex(list(_SWEET))
_SAVOURY_RE = _word_regex(list(_SAVOURY))
_OUTDOOR_RE = _word_regex(list(_OUTDOOR))
_INTERIOR_RE = _word_regex(list(_INTERIOR))
_KNOWN_NOUNS = (set(_SWAP_FORMS) | set(_PEOPLE_ANIMAL_FORMS) | set(_COLOURABLE_FORMS) | set(_MATERIALABLE_FORMS)
                | _SWEET | _SAVOURY | {"collar", "leash", "flowers", "trees", "candles", "fruit", "hat",
                                       "ball", "toy", "dog", "tie", "glasses", "balloons", "clouds"})
_ARTICLE_BEFORE = re.compile(r"\b(a|an)\s+$", re.IGNORECASE)


def _usable(text: str, m: re.Match[str]) -> bool:
    """A word match the grammar may edit: not a capitalised word inside the caption (a name
    such as "Golden Gate" or "Apple"), and not the tail of a compound ("teddy bear")."""
    start = m.start(1)
    if start > 0 and text[start].isupper():
        return False
    before = text[:start].split()
    return not (before and before[-1].lower() in _COMPOUND_BEFORE)


def _matches(pattern: re.Pattern[str], text: str) -> list[re.Match[str]]:
    return [m for m in pattern.finditer(text) if _usable(text, m)]


def _insert(text: str, pos: int, new: str) -> str:
    """Insert ``new`` at ``pos`` and fix an ``a``/``an`` right before it."""
    head, tail = text[:pos], text[pos:]
    m = _ARTICLE_BEFORE.search(head)
    if m:
        head = head[: m.start(1)] + _match_case(m.group(1), _article(new)) + head[m.end(1):]
    return head + new + tail


def _replace(text: str, start: int, end: int, new: str) -> str:
    """Replace ``text[start:end]`` with ``new`` (case matched) and fix the article before it."""
    return _insert(text[:start] + text[end:], start, _match_case(text[start:end], new))


def _words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _clean_caption(caption: str) -> str:
    return " ".join(caption.split()).rstrip(" .!;:,")
