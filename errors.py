"""The one exception type users see from this pack.

Every failure a user can cause (a bad file, a wrong LoRA, a value out of range, a
backend this device cannot run) raises QuantLoRAError with a message that names the
input, says what was wrong and what to do. ComfyUI shows it as an execution error and
goes on serving.
"""


class QuantLoRAError(ValueError):
    pass
