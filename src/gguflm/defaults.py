"""The default prompt (``gguflm verify``'s; model lookup is gguflm.models.resolve)."""

DEFAULT_PROMPT = "Is Paris the capital of France?"  # the seed's example question (gguflm verify)
