#!/bin/bash
# pagating bootstrap: the `onstart` text `pagating vast launch` sends (Vast caps args + args_str +
# onstart at 4,096 characters, so this stays short). It checks out the pinned commit and hands over
# to that commit's scripts/onstart.sh; everything else lives there. All output goes to $PAGATING_LOG
# (uploaded to the sweep's parent run as logs/instance-<id>.log) as well as to Vast's log.
# If it fails before onstart.sh runs, it reports why on the parent run (tag pagating.instance.<id>),
# since the project (and its log upload) is not there yet, then destroys the instance.
# Values longer than one Vast env entry (256 chars) arrive as NAME__1.. listed in PAGATING_SPLIT_ENV:
# joined first, before anything reads them.
for s in ${PAGATING_SPLIT_ENV//,/ }; do v=; for ((i=1;i<=${s##*:};i++)); do c=${s%:*}__$i; v+=${!c}; unset "$c"; done; export "${s%:*}=$v"; done
unset PAGATING_SPLIT_ENV s v c i
export PAGATING_LOG=${PAGATING_LOG:-/root/pagating-onstart.log}
exec > >(tee -a "$PAGATING_LOG") 2>&1
PY=${PAGATING_PYTHON:-python3}
# report STATE | destroy: stdlib Python (the image has no curl); MLflow REST set-tag (5 tries), Vast
# DELETE (tried for as long as the box lives; 404: destroyed already). Its own retry loops, not
# tracking.retry: the project is not checked out yet.
r() { "$PY" - "$@" <<'E'
import base64,json,os,sys,urllib.request as u
e=os.environ.get;i=e("CONTAINER_ID","local");h={"Content-Type":"application/json"}
def q(url,d,m,hd):
 try:u.urlopen(u.Request(url,json.dumps(d).encode(),hd,method=m),timeout=30);return 1
 except Exception as x:
  print("pagating-bootstrap:",m,url.split("/api/")[-1],"failed:",type(x).__name__,getattr(x,"code",""));return m=="DELETE" and getattr(x,"code",0)==404
if sys.argv[1]=="report":
 t,p=e("MLFLOW_TRACKING_TOKEN"),e("MLFLOW_TRACKING_PASSWORD")
 if t:h["Authorization"]="Bearer "+t
 elif p:h["Authorization"]="Basic "+base64.b64encode(f'{e("MLFLOW_TRACKING_USERNAME","")}:{p}'.encode()).decode()
 for n in range(5):
  if not e("PAGATING_PARENT_RUN_ID"):break
  if q(e("MLFLOW_TRACKING_URI","").rstrip("/")+"/api/2.0/mlflow/runs/set-tag",{"run_id":e("PAGATING_PARENT_RUN_ID"),"key":"pagating.instance."+i,"value":sys.argv[2][:4000]},"POST",h):sys.exit(0)
  __import__("time").sleep(2**n*(n<4))
 sys.exit(1)
k=e("CONTAINER_API_KEY");n=0
while k and not q(e("VAST_SERVER_URL","https://console.vast.ai")+f"/api/v0/instances/{i}/",{},"DELETE",{**h,"Authorization":"Bearer "+k}):
 n+=1;__import__("time").sleep(min(5*n,60))
E
}
f() { echo "$(date -u +%T) pagating-bootstrap: error: $1"; r report "failed: $1"; r destroy; exit 1; }
echo "$(date -u +%T) pagating-bootstrap: instance ${CONTAINER_ID:-local}, commit ${PAGATING_COMMIT:-?}"
r report "started: checking out ${PAGATING_COMMIT:-?}" || f "cannot reach the tracking server (MLFLOW_TRACKING_URI, credentials)"
command -v git >/dev/null || { apt-get update -qq && apt-get install -y -qq git; } >/dev/null 2>&1 || f "no git, and apt-get could not install it"
W=${PAGATING_WORKDIR:-/workspace/pagating}
mkdir -p "$W" && cd "$W" && { [ -d .git ] || git init -q; } || f "cannot use $W"
git remote remove origin 2>/dev/null; git remote add origin "$PAGATING_REPO" || f "bad PAGATING_REPO"
# The URL may hold a token: git's own messages stay off the log.
{ git fetch -q --depth 1 origin "$PAGATING_COMMIT" || git fetch -q origin; } >/dev/null 2>&1
git checkout -q --force "$PAGATING_COMMIT" >/dev/null 2>&1 && [ "$(git rev-parse HEAD)" = "$PAGATING_COMMIT" ] \
  || f "cannot check out commit $PAGATING_COMMIT (pushed? repo URL and access right?)"
exec bash scripts/onstart.sh
