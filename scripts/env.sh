# Source this file to put the nvrtc wheel's libnvrtc on LD_LIBRARY_PATH (no-op if absent).
_mulo_nvrtc="$(python3 "$(dirname "${BASH_SOURCE[0]}")/nvrtc_libdir.py" 2>/dev/null || true)"
if [ -n "$_mulo_nvrtc" ]; then
    export LD_LIBRARY_PATH="$_mulo_nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
unset _mulo_nvrtc
