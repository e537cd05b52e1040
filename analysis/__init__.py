"""chat-ad-audit: audit how an ad platform uses conversations with its AI assistant."""

__version__ = "0.1.0"
