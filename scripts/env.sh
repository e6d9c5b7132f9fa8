# Source this file: puts the project's virtual environment (`.venv`, made by scripts/setup, or
# $MULO_VENV) first on PATH, so that `python3` everywhere (scripts, CI steps, the tests that run
# Python) is its interpreter, and the nvrtc wheel's libnvrtc on LD_LIBRARY_PATH (no-op if absent).
_mulo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_mulo_venv="${MULO_VENV:-$_mulo_root/.venv}"
if [ -x "$_mulo_venv/bin/python3" ]; then
    case ":$PATH:" in
        *":$_mulo_venv/bin:"*) ;;
        *) export PATH="$_mulo_venv/bin:$PATH" ;;
    esac
    export VIRTUAL_ENV="$_mulo_venv"
fi
_mulo_nvrtc="$(python3 "$_mulo_root/scripts/nvrtc_libdir.py" 2>/dev/null || true)"
if [ -n "$_mulo_nvrtc" ]; then
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$_mulo_nvrtc:"*) ;;
        *) export LD_LIBRARY_PATH="$_mulo_nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
fi
unset _mulo_nvrtc _mulo_venv _mulo_root
