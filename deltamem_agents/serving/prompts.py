"""Every fixed text the library puts into a prompt or a written message, in one place."""

# The system prompt of training episodes and of the recall evaluations (the synthetic data's questions expect
# short answers). The chat uses the system message of the conversation instead.
SYSTEM_PROMPT = "Answer from memory with only the requested detail."

# Heads the BM25 notes in the read prompt's system message (chat and evaluation alike).
NOTES_HEADER = "Notes from earlier in this conversation:"

# Rendered before a message that is written on its own, so that templates which inject a default system prompt
# when none is given (SmolLM2's does) do not; its tokens are never written.
PLACEHOLDER_SYSTEM = {"role": "system", "content": "-"}

# Templates that know no "tool" role (the embedded SmolLM2's) see a tool result as a user message with this prefix.
TOOL_RESULT_PREFIX = "Tool result: "
