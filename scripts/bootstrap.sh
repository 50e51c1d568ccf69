#!/bin/bash
# pagating bootstrap: the `onstart` text `pagating vast launch` sends (Vast caps args + args_str +
# onstart at 4,096 characters, so this stays short). It checks out the pinned commit and hands over
# to that commit's scripts/onstart.sh; everything else lives there. All output goes to $PAGATING_LOG
# (uploaded to the sweep's parent run as logs/instance-<id>.log) as well as to Vast's log.
# If it fails before onstart.sh runs, it reports why on the parent run (tag pagating.instance.<id>),
# since the project (and its log upload) is not there yet, then destroys the instance.
export PAGATING_LOG=${PAGATING_LOG:-/root/pagating-onstart.log}
exec > >(tee -a "$PAGATING_LOG") 2>&1
PY=${PAGATING_PYTHON:-python3}
# report STATE | destroy: stdlib Python (the image has no curl); MLflow REST set-tag, Vast DELETE.
# Its own retry loop, not tracking.retry: the project is not checked out yet.
r() { "$PY" - "$@" <<'E'
import base64,json,os,sys,urllib.request as u
e=os.environ.get;i=e("CONTAINER_ID","local");h={"Content-Type":"application/json"}
def q(url,d,m,hd):
 try:u.urlopen(u.Request(url,json.dumps(d).encode(),hd,method=m),timeout=30);return 1
 except Exception as x:print("pagating-bootstrap:",m,url.split("/api/")[-1],"failed:",type(x).__name__,getattr(x,"code",""))
if sys.argv[1]=="report":
 t,p=e("MLFLOW_TRACKING_TOKEN"),e("MLFLOW_TRACKING_PASSWORD")
 if t:h["Authorization"]="Bearer "+t
 elif p:h["Authorization"]="Basic "+base64.b64encode(f'{e("MLFLOW_TRACKING_USERNAME","")}:{p}'.encode()).decode()
 sys.exit(0 if e("PAGATING_PARENT_RUN_ID") and q(e("MLFLOW_TRACKING_URI","").rstrip("/")+"/api/2.0/mlflow/runs/set-tag",{"run_id":e("PAGATING_PARENT_RUN_ID"),"key":"pagating.instance."+i,"value":sys.argv[2][:4000]},"POST",h) else 1)
k=e("CONTAINER_API_KEY")
for n in range(6):
 if not k or q(e("VAST_SERVER_URL","https://console.vast.ai")+f"/api/v0/instances/{i}/",{},"DELETE",{**h,"Authorization":"Bearer "+k}):break
 __import__("time").sleep(5*n+1)
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
