#!/bin/sh
# NBD over TLS: nbdcopy reads 512 MiB of random data (to null:) from `qcowpress serve image`
# and from qemu-nbd with the same certificates, over TLS and in plaintext; best of N (default 3),
# the four runs interleaved in each round so that they share the machine's state.
# Target: qcowpress over TLS no slower than qemu-nbd over TLS.
#
# Usage: bench/nbd_tls_bench.sh [ROUNDS] [WORKDIR]   (QCOWPRESS_BIN overrides the binary;
# default .build/release/qcowpress). Prints one Markdown table.
set -eu
ROUNDS=${1:-3}
WORK=${2:-$(mktemp -d /tmp/nbd-tls-bench.XXXXXX)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
QP=${QCOWPRESS_BIN:-$ROOT/.build/release/qcowpress}
CONNS=${CONNS:-4}
mkdir -p "$WORK"
cd "$WORK"
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

# A CA, a server certificate for 127.0.0.1 and a client certificate (EC P-256, as the tests).
if [ ! -f alice/client-cert.pem ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem -days 30 -subj "/CN=bench CA" 2>/dev/null
    sign() {  # DIR CN KIND EXT
        mkdir -p "$1"; cp ca-cert.pem "$1/"
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1/$3-key.pem" -out "$1/req.csr" -subj "/CN=$2" 2>/dev/null
        printf '%s\n' "$4" > "$1/ext.cnf"
        openssl x509 -req -in "$1/req.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 -extfile "$1/ext.cnf" -out "$1/$3-cert.pem" 2>/dev/null
        rm "$1/req.csr" "$1/ext.cnf"; chmod 600 "$1/$3-key.pem"
    }
    sign server 127.0.0.1 server "extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1"
    sign alice alice client "extendedKeyUsage=clientAuth"
fi
[ -f random.raw ] || head -c 512M /dev/urandom > random.raw
cat random.raw > /dev/null  # in the page cache for every run

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
waitport() { python3 - "$1" <<'PY'
import socket, sys, time
for _ in range(500):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1]))).close(); break
    except OSError: time.sleep(0.02)
PY
}

# qcowpress: over TLS and plaintext (loopback); the URL is the first line it prints.
"$QP" serve image --listen 127.0.0.1:0 --tls-creds server random.raw > qp-tls.url 2> qp-tls.err & pids="$pids $!"
"$QP" serve image --listen 127.0.0.1:0 random.raw > qp-plain.url 2> qp-plain.err & pids="$pids $!"
# qemu-nbd: the same file and certificates (--shared: nbdcopy opens CONNS connections).
P1=$(freeport); qemu-nbd -r -f raw -t --shared=8 -b 127.0.0.1 -p "$P1" -x random.raw \
    --object tls-creds-x509,id=tls0,dir="$WORK/server",endpoint=server --tls-creds tls0 random.raw 2> qn-tls.err & pids="$pids $!"
P2=$(freeport); qemu-nbd -r -f raw -t --shared=8 -b 127.0.0.1 -p "$P2" -x random.raw random.raw 2> qn-plain.err & pids="$pids $!"
waitport "$P1"; waitport "$P2"
while [ ! -s qp-tls.url ] || [ ! -s qp-plain.url ]; do sleep 0.05; done
QP_TLS="$(head -1 qp-tls.url)?tls-certificates=$WORK/alice"
QP_PLAIN=$(head -1 qp-plain.url)
QN_TLS="nbds://127.0.0.1:$P1/random.raw?tls-certificates=$WORK/alice"
QN_PLAIN="nbd://127.0.0.1:$P2/random.raw"

run() {  # URI -> seconds
    s=$(date +%s.%N); nbdcopy --connections="$CONNS" "$1" null: ; e=$(date +%s.%N)
    printf '%.3f' "$(echo "$e - $s" | bc)"
}
best() { tr ' ' '\n' | grep . | sort -n | head -1; }
t1=""; t2=""; t3=""; t4=""
i=0
while [ $i -lt "$ROUNDS" ]; do
    t1="$t1 $(run "$QP_TLS")"; t2="$t2 $(run "$QN_TLS")"
    t3="$t3 $(run "$QP_PLAIN")"; t4="$t4 $(run "$QN_PLAIN")"
    i=$((i + 1))
done
b1=$(echo $t1 | best); b2=$(echo $t2 | best); b3=$(echo $t3 | best); b4=$(echo $t4 | best)
rate() { echo "scale=0; 512 / $1" | bc; }
echo "| nbdcopy -C $CONNS of 512 MiB random to null: | best of $ROUNDS | MiB/s | all runs (s) |"
echo "|---|---|---|---|"
echo "| qcowpress serve image, TLS | $b1 s | $(rate "$b1") | $t1 |"
echo "| qemu-nbd, TLS (same certificates) | $b2 s | $(rate "$b2") | $t2 |"
echo "| qcowpress serve image, plaintext | $b3 s | $(rate "$b3") | $t3 |"
echo "| qemu-nbd, plaintext | $b4 s | $(rate "$b4") | $t4 |"
echo "qcowpress/qemu-nbd over TLS: $(printf '%.2f' "$(echo "scale=3; $b1 / $b2" | bc)")x the time (target <= 1)"
