"""The closed list of status and reason codes every stage writes instead of raising on bad data."""

KEPT, REJECTED, FAILED = "kept", "rejected", "failed"
STATUSES = (KEPT, REJECTED, FAILED)

# Download / decode failures (status=failed)
HTTP_ERROR = "http_error"  # any other HTTP status; specific codes are written as http_<code>
TIMEOUT = "timeout"
CONNECTION = "connection_error"
INVALID_URL = "invalid_url"  # not http(s), unparsable
OPT_OUT = "opt_out"  # X-Robots-Tag noai/noimageai/none or robots.txt honoured
BLOCKED_ADDRESS = "blocked_address"  # not globally routable (loopback, private, ...) or a non-http(s) redirect
TOO_LARGE = "too_large"  # body over curation.download.max_bytes
TOO_MANY_REDIRECTS = "too_many_redirects"
NOT_AN_IMAGE = "not_an_image"  # HTML served as .jpg, truncated or corrupt bytes
DECOMPRESSION_BOMB = "decompression_bomb"
UNSUPPORTED_FORMAT = "unsupported_format"  # a real image, but GIF/TIFF/BMP/... or animated PNG/WebP
DOWNLOAD_ERROR = "download_error"  # anything else the downloader reported
# Images on disk (--images): files that cannot be read as they are, never opened or never read twice
UNREADABLE = "unreadable"  # a file (image, .txt caption, a folder of them) the process may not read
SPECIAL_FILE = "special_file"  # a FIFO, socket or device where an image or caption was expected: never opened
UNRESOLVED_LINK = "unresolved_link"  # a link whose target is missing, a loop, or (in a tar) outside the tar

# Curation decisions (status=rejected)
TOO_SMALL = "too_small"
ASPECT_RATIO = "aspect_ratio"
LOW_QUALITY = "low_quality"
LOW_AESTHETIC = "low_aesthetic"
NSFW = "nsfw"
WATERMARK = "watermark"
DUPLICATE = "duplicate"

# Later stages (status=failed)
CAPTION_ERROR = "caption_error"
EMPTY_CAPTION = "empty_caption"  # nothing, or too few words, left of the caption
# The caption-quality guard (captioning/guard.py): generated, but not a caption to train on
DEGENERATE_CAPTION = "degenerate_caption"  # repetition loop: repeated words, phrases, sentences or characters
TRUNCATED_CAPTION = "truncated_caption"  # cut at the token limit (engine finish reason, or an unfinished sentence)
REFUSED_CAPTION = "refused_caption"  # "I'm sorry, I cannot ...", "As an AI ..."
WRONG_LANGUAGE = "wrong_language"  # mostly another script, or another language, than the prompt asked for
MISSING_CAPTION = "missing_caption"
NO_ALT_TEXT = "no_alt_text"  # the pass-through captioner: the sample has no KEY.txt text to pass on
ENCODE_ERROR = "encode_error"
NON_FINITE = "non_finite"  # NaN/Inf in an encoder output
CORRUPT_SHARD = "corrupt_shard"
NOT_IN_TIER = "not_in_tier"

REASONS = (
    HTTP_ERROR,
    TIMEOUT,
    CONNECTION,
    INVALID_URL,
    OPT_OUT,
    BLOCKED_ADDRESS,
    TOO_LARGE,
    TOO_MANY_REDIRECTS,
    NOT_AN_IMAGE,
    DECOMPRESSION_BOMB,
    UNSUPPORTED_FORMAT,
    DOWNLOAD_ERROR,
    UNREADABLE,
    SPECIAL_FILE,
    UNRESOLVED_LINK,
    TOO_SMALL,
    ASPECT_RATIO,
    LOW_QUALITY,
    LOW_AESTHETIC,
    NSFW,
    WATERMARK,
    DUPLICATE,
    CAPTION_ERROR,
    EMPTY_CAPTION,
    DEGENERATE_CAPTION,
    TRUNCATED_CAPTION,
    REFUSED_CAPTION,
    WRONG_LANGUAGE,
    MISSING_CAPTION,
    NO_ALT_TEXT,
    ENCODE_ERROR,
    NON_FINITE,
    CORRUPT_SHARD,
    NOT_IN_TIER,
)


# The reasons that are decisions about a usable image (status=rejected); every other one is a failure.
REJECTIONS = (TOO_SMALL, ASPECT_RATIO, LOW_QUALITY, LOW_AESTHETIC, NSFW, WATERMARK, DUPLICATE, NOT_IN_TIER)


def status_of(reason: str | None) -> str:
    """`kept` without a reason, `rejected` for a decision (REJECTIONS), else `failed`."""
    if not reason:
        return KEPT
    return REJECTED if reason in REJECTIONS else FAILED


def http_reason(code: int) -> str:
    """Stable reason for an HTTP status: http_404, http_500, ..."""
    return f"http_{int(code)}"


def is_reason(code: str) -> bool:
    return code in REASONS or (code.startswith("http_") and code[5:].isdigit())
