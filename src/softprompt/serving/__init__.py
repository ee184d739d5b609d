"""Serving many soft prompts from one frozen model: an OpenAI-compatible HTTP API over
:class:`softprompt.engine.Engine`, a prompt registry confined to one directory, and a
playground page."""
