"""langchain-core's standard unit tests for chat models, where they apply offline."""

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests
from tiny_chat import tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat

ENGINE = tiny_engine()


class TestDeltaMemChatStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return DeltaMemChat

    @property
    def chat_model_params(self) -> dict:
        return {"engine": ENGINE}

    @property
    def standard_chat_model_params(self) -> dict:
        # A local model has no API key, request timeout or retries: DeltaMemChat refuses unknown constructor
        # arguments instead of ignoring them (tests/test_conventions.py), so the API-model ones are left out.
        params = super().standard_chat_model_params
        params = {k: v for k, v in params.items() if k not in ("api_key", "timeout", "max_retries")}
        return {**params, "max_tokens": 8}  # short replies keep the suite fast on the tiny backbone

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @pytest.mark.xfail(reason="the engine holds a torch model: it is not serializable, like any local model")
    def test_serdes(self, *args, **kwargs):
        super().test_serdes(*args, **kwargs)
