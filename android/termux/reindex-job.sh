#!/data/data/com.termux/files/usr/bin/sh
# Android's own scheduler as the trigger for re-indexing: termux-job-scheduler runs this script
# when the phone is charging and idle (constraints given when scheduling, below); it asks the
# running daemon to re-index each table listed in $POCKETEMBED_HOME/reindex.conf, one per line:
#     DB TABLE ID_COLUMN TEXT_COLUMN [COLLECTION]
# Each DB must lie under a directory of the daemon's job_sources setting (e.g.
# POCKETEMBED_JOB_SOURCES=$HOME/data in the service's env file); others are refused.
# A re-run embeds only new and changed rows, so running it often is cheap.
#
# Schedule (every 6 h at most, only on the charger and idle, kept across reboots):
#   termux-job-scheduler --job-id 4711 --script "$HOME/.termux/pocketembed-reindex.sh" \
#       --period-ms 21600000 --charging true --idle true --persisted true
# Cancel: termux-job-scheduler --cancel --job-id 4711
PREFIX=${PREFIX:-/data/data/com.termux/files/usr}
HOME="${HOME:-/data/data/com.termux/files/home}"
POCKETEMBED_HOME="${POCKETEMBED_HOME:-$HOME/.local/share/pocketembed}"
CONF="${POCKETEMBED_REINDEX_CONF:-$POCKETEMBED_HOME/reindex.conf}"
PE="${POCKETEMBED_BIN:-$PREFIX/bin/pocketembed}"
[ -f "$CONF" ] || { echo "reindex: no $CONF" >&2; exit 0; }
status=0
while read -r db table id text collection; do
    case "$db" in ''|'#'*) continue ;; esac
    if ! "$PE" index --db "$db" --table "$table" --id "$id" --text "$text" ${collection:+--collection "$collection"}; then
        status=1
    fi
done < "$CONF"
exit "$status"
