"""The one exception type users see from this pack.

Every failure a user can cause (a bad file, a wrong LoRA, a value out of range, a
backend this device cannot run, running out of GPU memory) raises QuantLoRAError with a
message that names the input, says what was wrong and what to do. ComfyUI shows it as an
execution error and goes on serving. docs/errors.md lists every case.
"""


class QuantLoRAError(ValueError):
    pass


def check_choice(input_name: str, value, options) -> str:
    """A combo input's value, checked: ComfyUI 0.3.75 does not check a V3 node's combo values
    against their options, so an API-format prompt can send anything."""
    options = list(options)
    if not isinstance(value, str) or value not in options:
        shown = ", ".join(map(str, options[:20])) + (", ..." if len(options) > 20 else "")
        raise QuantLoRAError(f"{input_name} {value!r} is not one of the choices ({shown}). "
                             "Pick one from the node's list (refresh the page if the list changed).")
    return value
